"""Answer extraction on realistic model outputs, rule for rule as pyreft/LLM-Adapters apply them."""
import pytest

from reftbench.tasks.answers import ANSWER_CHECKS, after_trigger, first_letter, last_number

number, letter, math = ANSWER_CHECKS["number"], ANSWER_CHECKS["letter"], ANSWER_CHECKS["math"]
trigger_exact, first_match = ANSWER_CHECKS["trigger_exact"], ANSWER_CHECKS["first_match"]


@pytest.mark.parametrize("text,value", [
    ("The answer is 5.", 5.0),
    ("She pays $1,234 in total. The answer is 1,234.", 1234.0),  # commas are thousands separators
    ("It drops 10 degrees from 4, so 4 - 10 = -6. The answer is -6.", -6.0),
    ("Each costs 2.25, so 3 * 2.25 = 6.75 dollars.", 6.75),
    ("First 12 + 30 = 42, then 42 / 2 = 21.\nThe answer is 21", 21.0),  # several numbers: the last one
    ("\nA: 3 boxes of 4 apples make 12 apples. The answer is 12.\n\n", 12.0),
    ("There are 1,000,000 stars.", 1e6),
    ("no digits here", None),
])
def test_last_number(text, value):
    assert last_number(text) == value


def test_number_check():
    assert number("The answer is 850.", "850.0")
    assert number("So she has 1,200 - 350 = 850 chickens left.", "850.0")
    assert number("The temperature is now -6 degrees.", "-6.0")
    assert not number("The temperature is now 6 degrees.", "-6.0")  # the sign counts
    assert number("x = 1.8333", "1.8333333333333335")  # within 0.001
    assert not number("x = 1.83", "1.8333333333333335")
    assert not number("The answer is 60. Wait, 5 * 12 = 61", "60.0")  # the last number, not the first
    assert not number("I do not know.", "8.0")


@pytest.mark.parametrize("text,letter_", [
    ("The answer is (B).", "B"),
    ("(C) 4", "C"),
    ("the answer is d", ""),  # lower case never matches
    # Letters inside words count, as in LLM-Adapters evaluate.py: "Each" reads as E, "After" as A.
    ("Each ticket costs $3, so 4 tickets cost $12. The answer is (B).", "E"),
    ("After 2 hours the car has gone 120 km. The answer is C.", "A"),
    ("so x = 4. The answer is (C).", "C"),
    ("", ""),
])
def test_first_letter_follows_llm_adapters(text, letter_):
    assert first_letter(text) == letter_


def test_letter_check_aqua():
    assert letter("\nRationale: 15% of 80 is 12.\nThe answer is (B).", "B")
    assert not letter("\nEach 15% of 80 is 12. The answer is (B).", "B")  # the E of "Each" comes first
    assert letter(" C", "C")


def test_math_check_dispatches_on_the_answer():
    assert math("The answer is 60.", "60.0") and not math("The answer is 61.", "60.0")
    assert math("The answer is (B).", "B") and not math("The answer is (B).", "C")


def test_after_trigger():
    assert after_trigger("the correct answer is  answer2\n", "the correct answer is ") == "answer2\n"
    assert after_trigger("I think answer2", "the correct answer is ") == ""


@pytest.mark.parametrize("output,answer,pyreft,llm_adapters", [
    ("the correct answer is answer1", "answer1", True, True),
    ("the correct answer is true", "true", True, True),
    ("the correct answer is solution2 ", "solution2", True, True),
    ("the correct answer is option1\n", "option1", True, True),
    # extra text after the answer: wrong for pyreft (exact match), right for LLM-Adapters (first match)
    ("the correct answer is ending3. The person keeps riding", "ending3", False, True),
    ("the correct answer is answer2 because answer1 is a gas", "answer2", False, True),
    ("the correct answer is answer2 because answer1 is a gas", "answer1", False, False),
    ("answer1", "answer1", False, True),  # no trigger: pyreft reads an empty generation
    ("The correct answer is false", "false", False, True),  # the trigger is case-sensitive
    ("the correct answer is answer12", "answer1", False, True),  # LLM-Adapters' regex has no word boundary
])
def test_commonsense_checks(output, answer, pyreft, llm_adapters):
    labels = {"a": "answer1|answer2|answer3|answer4|answer5", "t": "true|false", "f": "true|false", "s": "solution1|solution2",
              "o": "option1|option2", "e": "ending1|ending2|ending3|ending4"}[answer[0]]
    assert trigger_exact(output, answer, trigger="the correct answer is ", labels=labels) is pyreft
    assert first_match(output, answer, labels=labels) is llm_adapters


def test_exact_and_none():
    assert ANSWER_CHECKS["exact"]("c, b, a\nmore", "c, b, a")
    assert ANSWER_CHECKS["none"]("anything", None) is False
