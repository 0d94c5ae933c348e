"""Task sets with exact answers: a seeded arithmetic word-problem generator, a jsonl loader, the prompt format and
the answer checker (shared by task behaviour under head perturbation and head-masked fine-tuning).

    problems = generate_problems(100, split="test", difficulty=2, seed=0)     # list[Problem]
    problems = load_jsonl("data/gsm8k_test.jsonl")                           # `question` and `answer` fields
    ids = encode_problem(tokenizer, problems[0])                             # chat template + instruction
    check = check_answer("... so the answer is 12.", problems[0].answer)     # Check(extracted, correct, method)

Generator. A problem is a start sentence and up to two operations on the running count, all with integer
results (no negative counts, exact division only):
    start  "Mia has {a} apples."                       -> a
           "Mia has {a} bags with {b} apples in each."  -> a * b          (counts as one step)
    ops    "She buys {b} more."  (+b)   "She gives {b} to a friend."  (-b, only when b < count)
           "She shares them equally among {c} friends." (/c, only when c divides the count; always the last step)
One-step problems are start-with-one-op or a bags start alone; two-step problems have two steps. `difficulty`
picks the operand range and the share of two-step problems (DIFFICULTIES); difficulty 0 is bare one-step
arithmetic on digits ("What is 7 - 3?", "Compute 4 * 6.", ...: +, - with a non-negative result, *). Train / test split: the two splits
use separate seeded streams (numpy SeedSequence([seed, split, difficulty, index])) AND a content rule (a hash of the
problem text puts it in "train" or "test", 1 in 5 in test), so no problem appears in both splits for any seeds.

Jsonl files (GSM8K, MATH, ... downloaded on a login node with `datasets`, see README): one object per line with
`question` and `answer` (number or string; a GSM8K-style answer "... #### 72" keeps the part after '####');
optional `id` and `split`.

Prompt format (PROMPT_TEMPLATE and ANSWER_PREFIX, the one place): the question and an instruction to answer with a
number, as a user turn with the tokenizer's chat template plus the assistant header (chat_template=True; else the
plain text), then the start of the reply, "The answer is" (answer_prefix; "" lets the model reason before it
answers, for larger models with more new tokens). `reply_text` joins the prefix and a generation for checking;
`target_text(problem)` is the matching reference reply for supervised fine-tuning.

Checking: first the answer span of the reply (the first \\boxed{..}; else the first "answer is ..." sentence; else
the whole reply, so text a model writes after its answer does not count), then math-verify on that span
(`math_verify.parse` / `verify`: LaTeX, plain numbers, its own anchors). Numeric fallback, used when math-verify
extracts nothing or fails: the last number of the span (sign, thousands separators, decimals, a/b fractions)
compared with the gold number within 1e-9 relative tolerance.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

__all__ = ["ANSWER_PREFIX", "DIFFICULTIES", "TaskError", "Problem", "generate_problems", "gold_text", "load_jsonl",
           "load_task", "prompt_text", "target_text", "encode_problem", "reply_text", "Check", "to_number",
           "numeric_check", "check_answer", "reward"]

SPLITS = ("train", "test")
TEST_SHARE = 5                      # 1 in TEST_SHARE problems (by content hash) belongs to the test split
PROMPT_TEMPLATE = "{question}\nGive the final answer as a number."
ANSWER_PREFIX = "The answer is"        # the reply is started with this (answer_prefix="" lets the model reason first)
TARGET_TEMPLATE = "{prefix} {answer}."


@dataclass(frozen=True)
class Level:
    """Operand range [lo, hi] and the share of two-step problems of one difficulty."""
    lo: int
    hi: int
    two_step: float
    bare: bool = False      # "What is 3 + 4?" instead of a word problem


DIFFICULTIES = {0: Level(1, 9, 0.0, bare=True), 1: Level(2, 9, 0.0), 2: Level(2, 20, 0.0), 3: Level(2, 20, 0.5), 4: Level(2, 50, 1.0),
                5: Level(10, 200, 1.0)}

_PEOPLE = [("Mia", "She"), ("Tom", "He"), ("Ana", "She"), ("Leo", "He"), ("Zoe", "She"), ("Sam", "He"),
           ("Ivy", "She"), ("Ben", "He"), ("Lea", "She"), ("Max", "He")]
_BARE = ["What is {expr}?", "Compute {expr}.", "Calculate {expr}.", "How much is {expr}?"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "cards", "shells", "coins"]


class TaskError(ValueError):
    """A task file or task parameter that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str            # the gold answer as text (an exact integer for generated problems)
    split: str = "test"
    steps: int = 0         # 1 or 2 for generated problems, 0 when unknown (loaded files)
    difficulty: int = 0

    def to_record(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- generator

def _split_of(question: str) -> str:
    digest = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16)
    return "test" if digest % TEST_SHARE == 0 else "train"


def _start(rng, level: Level, two_step: bool) -> tuple[str, int, int]:
    """-> (sentence template with {name}/{items}, count, steps used)."""
    a = int(rng.integers(level.lo, level.hi + 1))
    if rng.random() < 0.3 or (not two_step and rng.random() < 0.25):
        b = int(rng.integers(2, min(level.hi, 12) + 1))
        return f"{{name}} has {a} bags with {b} {{items}} in each bag.", a * b, 1
    return f"{{name}} has {a} {{items}}.", a, 0


def _operation(rng, level: Level, count: int, last: bool) -> tuple[str, int, bool] | None:
    """One step on `count` -> (sentence, new count, is a division) or None when the drawn step is impossible."""
    kind = rng.choice(["add", "sub", "div"] if last else ["add", "sub"])
    b = int(rng.integers(level.lo, level.hi + 1))
    if kind == "add":
        return f"{{pron}} buys {b} more {{items}}.", count + b, False
    if kind == "sub":
        return (f"{{pron}} gives {b} {{items}} to a friend.", count - b, False) if b < count else None
    divisors = [c for c in range(2, min(level.hi, 12) + 1) if count % c == 0 and count // c >= 1]
    if not divisors:
        return None
    c = int(rng.choice(divisors))
    return f"{{pron}} shares them equally among {c} friends.", count // c, True


def _draw_bare(rng, level: Level) -> tuple[str, int, int]:
    a, b = (int(x) for x in rng.integers(level.lo, level.hi + 1, size=2))
    op = rng.choice(["+", "-", "*"])
    a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
    ask = _BARE[int(rng.integers(len(_BARE)))].format(expr=f"{a} {op} {b}")
    return ask, a + b if op == "+" else a - b if op == "-" else a * b, 1


def _draw(rng, level: Level) -> tuple[str, int, int] | None:
    """One candidate problem -> (question, answer, steps) or None to redraw."""
    if level.bare:
        return _draw_bare(rng, level)
    two_step = bool(rng.random() < level.two_step)
    want = 2 if two_step else 1
    sentence, count, steps = _start(rng, level, two_step)
    parts, divided = [sentence], False
    while steps < want:
        op = _operation(rng, level, count, last=steps == want - 1)
        if op is None:
            return None
        parts.append(op[0])
        count, divided, steps = op[1], op[2], steps + 1
    person, pron = _PEOPLE[int(rng.integers(len(_PEOPLE)))]
    items = _ITEMS[int(rng.integers(len(_ITEMS)))]
    ask = "How many {items} does each friend get?" if divided else "How many {items} does {name} have now?"
    text = " ".join(parts + [ask]).format(name=person, pron=pron, items=items)
    return text, count, steps


def check_generator_args(n: int, split: str, difficulty: int, seed: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise TaskError(f"n (number of problems) must be a positive integer; got {n!r}")
    if split not in SPLITS:
        raise TaskError(f"split must be one of {list(SPLITS)}; got {split!r}")
    if difficulty not in DIFFICULTIES:
        raise TaskError(f"difficulty must be one of {sorted(DIFFICULTIES)} (operand range and share of two-step "
                        f"problems: {DIFFICULTIES}); got {difficulty!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TaskError(f"seed must be an integer; got {seed!r}")


def generate_problems(n: int, split: str = "test", difficulty: int = 2, seed: int = 0) -> list[Problem]:
    """`n` distinct arithmetic word problems of one split (deterministic in (n, split, difficulty, seed); the
    first k problems do not depend on n)."""
    check_generator_args(n, split, difficulty, seed)
    level, out, seen = DIFFICULTIES[difficulty], [], set()
    for index in range(200 * n + 1000):
        if len(out) == n:
            break
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS.index(split), difficulty, index]))
        drawn = _draw(rng, level)
        if drawn is None or drawn[0] in seen or _split_of(drawn[0]) != split:
            continue
        seen.add(drawn[0])
        out.append(Problem(f"arith-d{difficulty}-s{seed}-{split}-{len(out)}", drawn[0], str(drawn[1]), split,
                           drawn[2], difficulty))
    if len(out) < n:
        raise TaskError(f"difficulty {difficulty} has fewer than {n} distinct {split} problems; ask for fewer or "
                        f"a higher difficulty")
    return out


# ----------------------------------------------------------------------------- jsonl files

def gold_text(answer) -> str:
    """The gold answer of a record: numbers as text, GSM8K's '... #### 72' -> '72' (commas dropped there)."""
    if isinstance(answer, bool) or answer is None:
        return ""
    if isinstance(answer, (int, float)):
        return str(int(answer)) if float(answer).is_integer() else repr(float(answer))
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1].replace(",", "")
    return text.strip()


def _record(obj, path: Path, line_no: int) -> Problem:
    where = f"{path}, line {line_no}"
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: expected a JSON object with 'question' and 'answer', got {type(obj).__name__}")
    missing = [k for k in ("question", "answer") if k not in obj]
    if missing:
        raise TaskError(f"{where}: no {' / '.join(repr(k) for k in missing)} field (has {sorted(obj)}); every line "
                        f"needs 'question' and 'answer' (rename the dataset's fields when writing the file)")
    question, answer = str(obj["question"]).strip(), gold_text(obj["answer"])
    if not question or not answer:
        raise TaskError(f"{where}: empty {'question' if not question else 'answer'}; drop the line or fill it in")
    split = str(obj.get("split", "test"))
    return Problem(str(obj.get("id", f"{path.stem}-{line_no}")), question, answer, split)


def load_jsonl(path, split: str | None = None) -> list[Problem]:
    """Problems of a jsonl file (all lines, or those whose `split` field equals `split`; lines without `split`
    count as "test"). Raises TaskError for a missing, empty or malformed file or a line without an answer."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {str(path)!r} does not exist; give a jsonl path or task='arithmetic'")
    problems = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}, line {line_no}: not valid JSON ({e.msg}); the file must hold one JSON object "
                            f"per line (jsonl)") from None
        problems.append(_record(obj, path, line_no))
    if not problems:
        raise TaskError(f"task file {path} holds no problems (it is empty); write one JSON object per line with "
                        f"'question' and 'answer'")
    if split is not None:
        problems = [p for p in problems if p.split == split]
        if not problems:
            raise TaskError(f"task file {path} has no problems of split {split!r}; add a 'split' field or use "
                            f"split=None")
    return problems


def load_task(task: str, n: int | None = None, split: str = "test", difficulty: int = 2, seed: int = 0) -> list[Problem]:
    """task "arithmetic" -> generate_problems(n or 100, split, difficulty, seed); else a jsonl path (first n
    problems of `split`, or all of them when the file has no `split` fields and split is "test")."""
    if task == "arithmetic":
        return generate_problems(100 if n is None else n, split, difficulty, seed)
    if not isinstance(task, str) or not task.strip():
        raise TaskError(f"task must be 'arithmetic' or the path of a jsonl file; got {task!r}")
    problems = load_jsonl(task, split)
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise TaskError(f"n_problems must be a positive integer or None (all); got {n!r}")
        problems = problems[:n]
    return problems


# ----------------------------------------------------------------------------- prompt format

def prompt_text(problem: Problem) -> str:
    return PROMPT_TEMPLATE.format(question=problem.question)


def target_text(problem: Problem, answer_prefix: str = ANSWER_PREFIX) -> str:
    """Reference completion for supervised fine-tuning, in the form the prompt asks for (the whole reply,
    including the answer prefix)."""
    return TARGET_TEMPLATE.format(prefix=answer_prefix or "The answer is", answer=problem.answer)


def encode_problem(tokenizer, problem: Problem, chat_template: bool = True, answer_prefix: str = ANSWER_PREFIX) -> list[int]:
    """Prompt token ids: the chat template's user turn + assistant header (or the plain text, for base models),
    then the start of the reply `answer_prefix` ("" = none). Check a generation with reply_text(...)."""
    from lib.experiments.extract import encode_prompts
    ids = encode_prompts(tokenizer, [prompt_text(problem)], chat_template)[0]
    if not chat_template:
        ids = ids + tokenizer("\n", add_special_tokens=False).input_ids
    return ids + (tokenizer(answer_prefix, add_special_tokens=False).input_ids if answer_prefix else [])


def reply_text(generated: str, answer_prefix: str = ANSWER_PREFIX) -> str:
    """The whole reply: the answer prefix given in the prompt followed by the generated text."""
    return f"{answer_prefix}{generated}" if answer_prefix else generated


# ----------------------------------------------------------------------------- answer checking

@dataclass(frozen=True)
class Check:
    extracted: str | None      # the answer found in the text (None: nothing found)
    correct: bool
    method: str                # "math_verify", "numeric" (fallback) or "none"


_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _timeout() -> int | None:
    """math-verify's timeouts use SIGALRM, which exists only in the main thread."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def _math_verify(text: str, gold: str) -> Check | None:
    from math_verify import parse, verify
    try:
        pred = parse(text, parsing_timeout=_timeout())
        if not pred:
            return None
        ok = verify(parse(gold, parsing_timeout=_timeout()), pred, timeout_seconds=_timeout())
    except Exception:           # math-verify raising on odd input: use the numeric fallback
        return None
    return Check(str(pred[-1]), bool(ok), "math_verify")


def to_number(text: str) -> Fraction | None:
    """'1,234' -> 1234, '2.5' -> 5/2, '3/4' -> 3/4, '-7' -> -7; None when it is not a plain number."""
    try:
        return Fraction(text.replace(",", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


def numeric_check(text: str, gold: str) -> Check:
    """The fallback: last number of the text compared with the gold number (relative tolerance 1e-9)."""
    found = _NUMBER.findall(text)
    if not found:
        return Check(None, False, "none")
    value, want = to_number(found[-1]), to_number(gold_text(gold))
    ok = value is not None and want is not None and abs(value - want) <= Fraction(1, 10 ** 9) * max(1, abs(want))
    return Check(found[-1], bool(ok), "numeric")


_ANCHOR = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\n")


def answer_span(text: str) -> str:
    """The part of a reply that states the answer: the first \\boxed{..} (braces matched), else the first
    "answer is ..." / "answer: ..." up to the end of its sentence, else the whole text."""
    start = text.find("\\boxed{")
    if start >= 0:
        depth, i = 0, start + len("\\boxed")
        for i in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                break
        return text[start:i + 1]
    m = _ANCHOR.search(text)
    if m:
        end = _SENTENCE_END.search(text, m.end() + 1)
        return text[m.start():end.start() + 1 if end else len(text)]
    return text


def check_answer(text: str, gold) -> Check:
    """Is `text` (a model's reply) correct for `gold`? The answer span (answer_span) is checked with math-verify,
    or with the numeric fallback when math-verify finds nothing there."""
    gold, span = gold_text(gold), answer_span(text)
    return _math_verify(span, gold) or numeric_check(span, gold)


def reward(completions: list[str], answers: list[str]) -> list[float]:
    """1.0 for a correct completion, 0.0 otherwise (a correctness reward for RL fine-tuning)."""
    return [1.0 if check_answer(c, a).correct else 0.0 for c, a in zip(completions, answers)]
