"""A tiny random Llama, built in the test, saved as an ordinary checkpoint."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 128


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, inter: int = 128, dtype=torch.float32, bias=False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, attention_bias=bias,
                      mlp_bias=bias, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    # widen the weight distribution a little so quantization error is visible but bounded
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def save_tiny(path, **kw):
    model = tiny_llama(**kw)
    model.save_pretrained(path)
    return model


def save_tiny_with_tokenizer(path, **kw):
    """A tiny Llama checkpoint with its tokenizer beside it, as a model folder a user points the CLI at."""
    save_tiny(path, **kw)
    tiny_tokenizer().save_pretrained(path)
    return path


def calib_ids(n=16, seqlen=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    # a little structure (repeated n-grams) so that activations are correlated like text
    base = torch.randint(0, VOCAB, (n, seqlen // 4), generator=g)
    return base.repeat_interleave(4, dim=1) % VOCAB


class CharTokenizer:
    """Stand-in tokenizer: one token per character."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False, verbose=False):
        class Out:
            pass

        out = Out()
        out.input_ids = torch.tensor([[ord(c) % VOCAB for c in text]])
        return out


def tiny_tokenizer():
    """A real (fast) tokenizer over VOCAB ids: one token per character, so any text encodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 32 + VOCAB - 2)]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def set_quantization_options(directory, **options):
    """Write `options` into a saved checkpoint's quantization_config (to make it one an export must refuse)."""
    import json
    from pathlib import Path

    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(options)
    path.write_text(json.dumps(config))


class CrashAfter:
    """A block-loop listener (`pipeline.listening`) that raises once `n` blocks are done: recorded,
    installed and checkpointed, as a run killed right after its n-th checkpoint."""

    def __init__(self, n: int, exc: BaseException | None = None):
        self.n, self.done, self.exc = n, [], exc or RuntimeError("simulated crash")

    def before_block(self, i, name, stream, fp_stream):
        pass

    def before_solve(self, name, weight, hessian, d):
        pass

    def after_block(self, i, name, result):
        self.done.append(i)
        if len(self.done) == self.n:
            raise self.exc


class SeenBlocks:
    """A block-loop listener that keeps what each block was given: its quantized stream's inputs and
    kwargs, the full-precision stream's, and every solve's (W, H, D) in order."""

    def __init__(self):
        self.q, self.q_kwargs, self.fp, self.fp_kwargs, self.solves = {}, {}, {}, {}, []

    def before_block(self, i, name, stream, fp_stream):
        self.q[i], self.q_kwargs[i] = [x.clone() for x in stream[0]], stream[1]
        if fp_stream is not None:
            self.fp[i], self.fp_kwargs[i] = [x.clone() for x in fp_stream[0]], fp_stream[1]

    def before_solve(self, name, weight, hessian, d):
        self.solves.append((name, hessian.clone(), None if d is None else d.clone()))

    def after_block(self, i, name, result):
        pass
