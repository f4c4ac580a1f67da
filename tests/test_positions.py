"""Which tokens get intervened on: first/last prompt positions, short prompts, padding."""
import pytest
import torch

from reftbench import methods
from reftbench.data import collate_prompts, collate_train, encode_example
from reftbench.errors import ConfigError
from reftbench.architectures import backbone
from reftbench.positions import Positions

from conftest import method_cfg


@pytest.mark.parametrize("text,first,last", [("f7+l7", 7, 7), ("f3", 3, 0), ("l5", 0, 5), ("f1+l0", 1, 0)])
def test_parse(text, first, last):
    p = Positions.parse(text)
    assert (p.first, p.last) == (first, last)


@pytest.mark.parametrize("text", ["", "7", "f", "l7+f7", "f7l7", "f-1", "f0", "+l5", "f3+", "x3"])
def test_parse_rejects_malformed(text):
    with pytest.raises(ConfigError, match="positions"):
        Positions.parse(text)


def test_long_prompt_gets_first_and_last():
    assert Positions.parse("f3+l2").for_prompt(10) == ([0, 1, 2], [8, 9])


def test_short_prompt_caps_each_side_at_half():
    # n=5: floor(5/2)=2 on each side; the middle token (2) is left alone; f and l never overlap.
    assert Positions.parse("f7+l7").for_prompt(5) == ([0, 1], [3, 4])
    assert Positions.parse("f7+l7").for_prompt(1) == ([], [])
    assert Positions.parse("f3").for_prompt(4) == ([0, 1], [])


def test_groups_tied_and_untied():
    p = Positions.parse("f2+l2")
    assert p.groups(True) == ["tied"]
    assert p.groups(False) == ["first", "last"]
    assert Positions.parse("l3").groups(False) == ["tied"]  # one side only: a single intervention


def test_index_respects_offsets_and_lists_each_position_once():
    p = Positions.parse("f2+l2")
    rows, cols = p.index([6, 3], offsets=[0, 3], share_weights=True)["tied"]
    # row 0: prompt of 6 from 0 -> 0,1 and 4,5; row 1: prompt of 3 from 3 -> one first (3), one last (5)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 0), (0, 1), (0, 4), (0, 5), (1, 3), (1, 5)]
    first, last = (p.index([6, 1], offsets=[0, 0], share_weights=False)[g] for g in ("first", "last"))
    assert cols_of(first) == [0, 1] and cols_of(last) == [4, 5]  # the 1-token prompt gets nothing


def cols_of(index):
    return index[1].tolist()


def _changed_positions(model, method, batch):
    """Positions whose final hidden state moves when the method is active (last layer only)."""
    bb = backbone(model)
    with torch.no_grad():
        plain = bb(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        with method.context(batch):
            edited = bb(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return [(row != 0).nonzero().flatten().tolist() for row in (edited - plain).abs().amax(-1)]


def _method_on_last_layer(model, **kw):
    m = methods.build(method_cfg(layers=str(len(model.model.layers) - 1), **kw), model)
    with torch.no_grad():  # make the edit large so every selected position visibly moves
        for iv in m.interventions.values():
            iv.W.bias.fill_(3.0)
    return m


def test_right_padded_training_batch_touches_only_prompt_positions(llama):
    tok, model = llama.tokenizer, llama.model
    exs = [encode_example(tok, "abcdefghij", " xyz", 64), encode_example(tok, "abc", " q", 64)]
    batch = collate_train(exs, tok.pad_token_id)
    m = _method_on_last_layer(model, positions="f2+l2")
    changed = _changed_positions(model, m, batch)
    # prompt 0 has 11 tokens (BOS + 10 chars): 0,1 and 9,10. Answer tokens are never touched.
    assert changed[0] == [0, 1, 9, 10]
    # prompt 1 has 4 tokens: floor(4/2)=2 each side -> 0,1,2,3; padding (after the answer) untouched
    assert changed[1] == [0, 1, 2, 3]


def test_left_padded_generation_batch_skips_padding(llama):
    tok, model = llama.tokenizer, llama.model
    prompts = [tok("abcdefghij")["input_ids"], tok("abcd")["input_ids"]]
    batch = collate_prompts(prompts, tok.pad_token_id)
    m = _method_on_last_layer(model, positions="f1+l2", share_weights=False)
    changed = _changed_positions(model, m, batch)
    assert changed[0] == [0, 9, 10]
    pad = 11 - 5
    assert changed[1] == [pad + 0, pad + 3, pad + 4]
