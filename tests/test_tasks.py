"""lib.experiments.tasks: generator (exact answers recomputed from the text, splits disjoint, seeded), jsonl loading, prompt
format and answer checking on hand-written cases."""
import json
import re

import pytest

from lib.experiments import tasks


def _solve(question: str) -> int:
    """Recompute the answer from the question text alone (an independent reading of the templates)."""
    bare = re.fullmatch(r"(?:What is|Compute|Calculate|How much is) (\d+) ([-+*]) (\d+)[?.]", question)
    if bare:
        a, op, b = int(bare[1]), bare[2], int(bare[3])
        return a + b if op == "+" else a - b if op == "-" else a * b
    bags = re.search(r"has (\d+) bags with (\d+) \w+ in each bag", question)
    count = int(bags[1]) * int(bags[2]) if bags else int(re.search(r"has (\d+) \w+\.", question)[1])
    for verb, n in re.findall(r"(buys|gives|among) (\d+)", question):
        count = count + int(n) if verb == "buys" else count - int(n) if verb == "gives" else count / int(n)
    return count


@pytest.mark.parametrize("difficulty", sorted(tasks.DIFFICULTIES))
def test_generated_answers_are_exact_integers_of_the_text(difficulty):
    problems = tasks.generate_problems(60, "test", difficulty, seed=3)
    for p in problems:
        value = _solve(p.question)
        assert value == int(p.answer) and float(value).is_integer() and value >= 0, p
        assert p.steps in (1, 2)
    level = tasks.DIFFICULTIES[difficulty]
    two = sum(p.steps == 2 for p in problems) / len(problems)
    assert (two == 0) if level.two_step == 0 else (two == 1) if level.two_step == 1 else 0.2 < two < 0.8


def test_splits_are_disjoint_seeded_and_prefix_stable():
    train = tasks.generate_problems(400, "train", 2, seed=0)
    test = tasks.generate_problems(100, "test", 2, seed=0)
    other_seed_test = tasks.generate_problems(100, "test", 2, seed=1)
    assert not {p.question for p in train} & {p.question for p in test}
    assert not {p.question for p in train} & {p.question for p in other_seed_test}
    assert len({p.question for p in test}) == 100
    assert tasks.generate_problems(100, "test", 2, seed=0) == test
    assert tasks.generate_problems(10, "test", 2, seed=0) == test[:10]
    assert [p.question for p in other_seed_test] != [p.question for p in test]
    assert all(p.split == "train" for p in train) and all(p.split == "test" for p in test)


@pytest.mark.parametrize("args, match", [((0, "test", 2, 0), "n"), ((5, "dev", 2, 0), "split"),
                                         ((5, "test", 9, 0), "difficulty"), ((5, "test", 2, "x"), "seed")])
def test_generator_bad_arguments(args, match):
    with pytest.raises(tasks.TaskError, match=match):
        tasks.generate_problems(*args)


@pytest.mark.parametrize("text, gold, correct", [
    ("The answer is 12.", "12", True),
    ("The answer is 12.", "13", False),
    ("7 + 5 = 12. The answer is 12.", "12", True),
    ("So she has 12 apples. The answer is 13", "13", True),             # the anchored answer, not the last
    ("The answer is 12. Next question: 5 + 3 = 8", "12", True),
    ("\\boxed{12}", "12", True),
    ("We get $\\boxed{12}$ in total.", "12", True),
    ("The answer is 2.5.", "2.5", True),
    ("The answer is 2.5.", "2", False),
    ("12.0", "12", True),
    ("The answer is 1,234.", "1234", True),
    ("The answer is -4.", "-4", True),
    ("no number at all", "12", False),
    ("", "12", False),
])
def test_check_answer_hand_written_cases(text, gold, correct):
    assert tasks.check_answer(text, gold).correct is correct


def test_extracted_values_and_methods():
    assert tasks.check_answer("The answer is 12.", "12").extracted == "12"
    assert tasks.check_answer("\\boxed{12}", "12").method == "math_verify"
    assert tasks.check_answer("nothing", "12") == tasks.Check(None, False, "none")


def test_numeric_fallback_directly():
    assert tasks.numeric_check("first 3 then 1,234", "1234") == tasks.Check("1,234", True, "numeric")
    assert tasks.numeric_check("about 0.5", "1/2").correct
    assert tasks.numeric_check("3/4 of it", "0.75").correct
    assert not tasks.numeric_check("it is 7", "8").correct
    assert tasks.to_number("abc") is None and tasks.to_number("-2.5") == tasks.Fraction(-5, 2)


def test_gold_text_gsm8k_and_numbers():
    assert tasks.gold_text("Natalia sold 48/2 = 24 clips.\n#### 1,072") == "1072"
    assert tasks.gold_text(12) == "12" and tasks.gold_text(12.0) == "12" and tasks.gold_text(2.5) == "2.5"
    assert tasks.check_answer("The answer is 72.", "She earned 72.\n#### 72").correct


def test_reward_scores_completions():
    assert tasks.reward(["The answer is 5.", "I think 4", "\\boxed{9}"], ["5", "5", "9"]) == [1.0, 0.0, 1.0]


def _write(path, lines):
    path.write_text("".join(lines))
    return path


def test_load_jsonl_fields_splits_and_ids(tmp_path):
    f = _write(tmp_path / "t.jsonl", [json.dumps({"question": "What is 2+3?", "answer": 5}) + "\n", "\n",
                                      json.dumps({"question": "Q2", "answer": "x\n#### 7", "split": "train",
                                                  "id": "b"}) + "\n"])
    problems = tasks.load_jsonl(f)
    assert [(p.question, p.answer, p.split) for p in problems] == [("What is 2+3?", "5", "test"), ("Q2", "7", "train")]
    assert problems[0].id == "t-1" and problems[1].id == "b"
    assert [p.id for p in tasks.load_jsonl(f, split="train")] == ["b"]
    assert [p.answer for p in tasks.load_task(str(f), n=1)] == ["5"]


@pytest.mark.parametrize("content, match", [
    ("", "empty"),
    ("\n\n", "empty"),
    ('{"question": "a", "answer": 1}\n{not json\n', "line 2: not valid JSON"),
    ('{"question": "a"}\n', "no 'answer' field"),
    ('{"answer": 3}\n', "no 'question' field"),
    ('{"question": "a", "answer": ""}\n', "empty answer"),
    ('[1, 2]\n', "expected a JSON object"),
])
def test_load_jsonl_bad_files(tmp_path, content, match):
    f = _write(tmp_path / "bad.jsonl", [content])
    with pytest.raises(tasks.TaskError, match=match):
        tasks.load_jsonl(f)


def test_load_task_missing_file_and_split(tmp_path):
    with pytest.raises(tasks.TaskError, match="does not exist"):
        tasks.load_task(str(tmp_path / "nope.jsonl"))
    f = _write(tmp_path / "t.jsonl", [json.dumps({"question": "q", "answer": 1}) + "\n"])
    with pytest.raises(tasks.TaskError, match="no problems of split 'train'"):
        tasks.load_task(str(f), split="train")


def test_prompt_format_uses_chat_template_and_instruction():
    from lib.model.bundled import bundled_tokenizer
    tok = bundled_tokenizer()
    p = tasks.generate_problems(1, "test", 1, 0)[0]
    text = tok.decode(tasks.encode_problem(tok, p, chat_template=True))
    assert p.question in text and "answer as a number" in text
    assert text.endswith("<|im_start|>assistant\nThe answer is")
    plain = tok.decode(tasks.encode_problem(tok, p, chat_template=False))
    assert "<|im_start|>" not in plain and plain.endswith("as a number.\nThe answer is")
    free = tok.decode(tasks.encode_problem(tok, p, chat_template=True, answer_prefix=""))
    assert free.endswith("<|im_start|>assistant\n")
    assert tasks.reply_text(" 12.") == "The answer is 12." and tasks.reply_text("x", "") == "x"
    assert tasks.target_text(p) == f"The answer is {p.answer}." and tasks.check_answer(tasks.target_text(p), p.answer).correct
