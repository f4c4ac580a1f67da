"""Training examples are tokenised as pyreft's examples/loreft does: prompt + answer as one text, then EOS.

Checked on a SentencePiece-style tokenizer (Metaspace pre-tokenizer, "▁" for a space, a word-initial
"▁" added to the first word only, newlines their own pieces, as LLaMA's), a tiny BPE trained here
offline, where a separately tokenised answer starts with a "▁" piece that the joint text does not have.
"""
import pytest

from reftbench.data import encode_example, encode_prompt

TEXTS = ["### Response:\nthe answer is yes", "### Response:\nthe answer is no", "Question: is it blue?\nthe answer is no",
         "2+3=5 apples", "1+4=5 apples", "0+5=5 pears"] * 3


@pytest.fixture(scope="module")
def sp_tok():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("\n"), "isolated"),
                                                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tk.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                      show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


@pytest.mark.parametrize("prompt,answer", [("### Response:\n", "the answer is yes"),
                                           ("Question: is it blue?\n", "the answer is no")])
def test_prompt_and_answer_are_tokenised_as_one_text(sp_tok, prompt, answer):
    e = encode_example(sp_tok, prompt, answer, 64)
    joint = sp_tok(prompt + answer)["input_ids"] + [sp_tok.eos_token_id]
    assert list(e["input_ids"]) == joint
    assert joint == sp_tok(prompt + answer + sp_tok.eos_token)["input_ids"]  # pyreft appends EOS as text: the same
    separate = encode_prompt(sp_tok, prompt) + sp_tok(answer, add_special_tokens=False)["input_ids"] + [sp_tok.eos_token_id]
    assert separate != joint  # the old encoding: a "▁" piece before the answer's first word
    assert sp_tok.convert_ids_to_tokens(separate[len(encode_prompt(sp_tok, prompt))]) == "▁"
    # the prompt at generation is the prompt alone: here it is token for token the training input's start
    p = e["prompt_length"]
    assert p == len(encode_prompt(sp_tok, prompt)) and list(e["input_ids"][:p]) == encode_prompt(sp_tok, prompt)
    assert list(e["labels"]) == [-100] * p + joint[p:]  # the loss on the answer and EOS only


def test_a_token_merged_across_the_boundary_follows_pyreft(sp_tok):
    """"2+3=" + "5 apples": the joint text has "▁2+3=5", the prompt alone ends "=". As pyreft, the labels
    start at the prompt's own length, so the merged token and the one after it are not learnt; generation
    sees "=", a prompt that training never showed. Documented in data.py."""
    prompt, answer = "2+3=", "5 apples"
    e = encode_example(sp_tok, prompt, answer, 64)
    alone = encode_prompt(sp_tok, prompt)
    assert "▁2+3=5" in sp_tok.convert_ids_to_tokens(list(e["input_ids"]))
    assert list(e["input_ids"][:len(alone)]) != alone
    assert e["prompt_length"] == len(alone) and list(e["labels"][:len(alone)]) == [-100] * len(alone)


def test_the_cut_keeps_the_joint_tokens(sp_tok):
    prompt, answer = "### Response:\n", "the answer is yes"
    joint = sp_tok(prompt + answer)["input_ids"] + [sp_tok.eos_token_id]
    p = len(encode_prompt(sp_tok, prompt))
    e = encode_example(sp_tok, prompt, answer, p + 1)
    assert list(e["input_ids"]) == joint[:p + 1] and e["truncated"]  # EOS cut, as pyreft's truncation cuts it
    assert encode_example(sp_tok, prompt, answer, p) is None  # the prompt alone fills max_length: dropped
