"""Our own checkpoint format, loaded and saved safely.

    guard.py       before any weight is read: the safetensors headers against the config (and the
                   load guard tensor that stops a loader without the plugin)
    validate.py    once the weights are loaded: the packed values (scales, zero points, g_idx, ...)
    save_hooks.py  a quantized model's save_pretrained / push_to_hub, which add the report and card

Exports to other engines' formats are in export/, GGUF in gguf/.
"""
