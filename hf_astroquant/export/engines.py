"""What vLLM 0.32 serves of each export, read off its loaders, so the export can say so up front.

A file the format holds exactly may still be refused by an engine: these are the engine's limits,
not the format's, so the export writes the file and prints the note.

    format              vLLM 0.32 refuses                                   source in vLLM
    gptq                sym=False; desc_act=True; bits other than 4 and 8   quantization/gptq*.py,
                                                                            kernels' type maps
    compressed-tensors  actorder "group" (a stored g_idx)                   compressed_tensors.py
    both, on CPU        bits other than 4 (CPUWNA16LinearKernel: uint4 /    kernels/linear/
                        uint4b8 only); AVX2-only CPUs (no 4-bit kernel)     mixed_precision/cpu.py
"""

from __future__ import annotations


def vllm_notes(fmt: str, bits: int, sym: bool, reordered: bool) -> list[str]:
    """Reasons vLLM 0.32 will not serve an export (empty when it serves it on AVX-512 CPUs and GPUs).
    `reordered`: GPTQ's desc_act / compressed-tensors' actorder "group" (a g_idx is stored)."""
    notes = []
    if fmt == "gptq":
        if not sym:
            notes.append("vLLM refuses asymmetric GPTQ (sym=False); export --format compressed-tensors instead")
        if reordered:
            notes.append("vLLM refuses GPTQ with desc_act=True; quantize with static_groups=True (the default) so "
                         "the groups stay contiguous")
        if bits not in (4, 8):
            notes.append(f"vLLM's GPTQ loader takes 4 or 8 bits, not {bits}")
    elif fmt == "compressed-tensors":
        if reordered:
            notes.append("vLLM refuses actorder 'group' (a stored g_idx); quantize with static_groups=True (the "
                         "default) for actorder 'weight', which it serves")
    if bits != 4:
        notes.append(f"vLLM's CPU kernel serves 4 bits only; {bits}-bit needs one of its GPU kernels (not checked here)")
    return notes
