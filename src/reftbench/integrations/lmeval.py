"""A trained run as an lm-evaluation-harness model, registered under the name `reftbench`.

    reftbench-lm-eval --model reftbench --model_args run=RUN_DIR --tasks hellaswag --device cpu
    python -c "import reftbench.integrations.lmeval, lm_eval; lm_eval.simple_evaluate(model='reftbench', ...)"

(`reftbench-lm-eval` is lm-eval's own command line with this model registered: lm-eval 0.4 finds
models only in its own fixed list or among classes already imported, so plain `lm_eval` cannot.)

The class is lm-eval's HF model (HFLM) around the run's rebuilt model; every forward and generate
runs inside the method's context, so ReFT interventions act exactly as in training and evaluation:
on the prompt's positions only. For a loglikelihood request the prompt is the context; the
continuation is never intervened on (its positions come after the context length). For generation
the prompt is the whole left-padded context, intervened on in the prefill only.
Needs the optional extra: pip install 'reftbench[lmeval]'.
"""
import sys
from collections import defaultdict

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..errors import ConfigError
from .runs import load_run


@register_model("reftbench")
class ReftbenchLM(HFLM):
    def __init__(self, run: str, device: str | None = None, batch_size=1, max_length=None, **kwargs):
        import torch
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")  # lm-eval's default: None
        loaded = load_run(run, device=device)  # HFLM then runs on the model's own device
        if loaded.kind != "decoder":
            raise ConfigError(f"run {run} trained a classifier (a {loaded.record.get('task')} run on an encoder): "
                              "lm-eval scores language models")
        self.run_dir, self.method, self.record = loaded.dir, loaded.method, loaded.record
        self._prompt_length = None  # set while one group of loglikelihood requests is scored
        # logits_cache off: lm-eval would reuse one forward for requests that share context + continuation
        # tokens but split them differently, and their prompts (so their interventions) differ.
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, backend="causal", logits_cache=False,
                         batch_size=batch_size, max_length=max_length, device=device, **kwargs)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """Score requests in groups of equal prompt (context) length, so each batch's intervention
        positions are known: the context tokens that survive lm-eval's left truncation."""
        groups = defaultdict(list)
        for i, (_, context, continuation) in enumerate(requests):
            kept = min(len(context) + len(continuation), self.max_length + 1) - 1  # lm-eval's input length
            groups[max(0, kept - (len(continuation) - 1))].append(i)
        out = [None] * len(requests)
        for prompt_length, idx in sorted(groups.items()):
            self._prompt_length = prompt_length
            try:
                scores = super()._loglikelihood_tokens([requests[i] for i in idx], disable_tqdm=True,
                                                       override_bs=override_bs)
            finally:
                self._prompt_length = None
            for i, s in zip(idx, scores):
                out[i] = s
        return out

    def _model_call(self, inps, attn_mask=None, labels=None):
        # Right-padded rows that all start with a context of self._prompt_length tokens.
        n = inps.shape[1] if self._prompt_length is None else self._prompt_length  # None: lm-eval's batch-size probe
        batch = {"input_ids": inps, "prompt_lengths": [n] * inps.shape[0], "prompt_offsets": [0] * inps.shape[0]}
        with self.method.context(batch):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        # Left-padded contexts: the attention mask says where each prompt starts.
        mask = generation_kwargs.get("attention_mask")
        lengths = (mask.sum(1) if mask is not None else (context != self.tokenizer.pad_token_id).sum(1)).tolist()
        batch = {"input_ids": context, "prompt_lengths": lengths,
                 "prompt_offsets": [context.shape[1] - n for n in lengths]}
        with self.method.context(batch):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)


def main() -> None:
    """lm-eval's own command line, with `--model reftbench` registered."""
    from lm_eval.__main__ import cli_evaluate
    try:
        cli_evaluate()
    except ConfigError as e:
        print(f"reftbench-lm-eval: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
