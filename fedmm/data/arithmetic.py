"""Multi-step arithmetic with worked solutions: the prompts of SPEAR's online fine-tuning, each with a
verifier (correct / incorrect) and feedback whose hint never states the answer.

A problem chains three or four small numbers with + - *, left to right (`37+48-19=?`); its worked
solution writes one step per line (`37+48=85`, `85-19=66`) and ends with the answer line `A: 66`.
The hint is the solution's first step, which never is the answer: every problem has two steps or
more. A problem's `kind` is its operator pattern (`+-`, `*+`, ...): clients' prompts are partitioned
by kind, so a client sees some patterns far more than others.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ANSWER_MARKER = "A:"
# Operator patterns, two or three operations each; `*` only on single digits, so results stay small.
KINDS = ("++", "+-", "-+", "--", "*+", "*-", "+++", "+-+", "-++", "*++")
_ANSWER = re.compile(r"A:\s*(-?\d+)")

# Seeds of the problem streams start with this word: no other stream of the project meets them.
ARITHMETIC_STREAM = 0xA817


@dataclass(frozen=True)
class Problem:
    """One prompt: `numbers` combined by `kind`'s operators from left to right."""

    numbers: tuple[int, ...]
    kind: str

    @property
    def prompt(self) -> str:
        expression = str(self.numbers[0]) + "".join(op + str(n) for op, n in zip(self.kind, self.numbers[1:]))
        return f"Q: {expression}=?\n"

    def steps(self) -> list[str]:
        """The worked solution's lines before the answer, e.g. ['37+48=85', '85-19=66']."""
        return chain_steps(self.numbers[0], self.kind, self.numbers[1:])

    @property
    def answer(self) -> int:
        return int(self.steps()[-1].rsplit("=", 1)[1])

    @property
    def solution(self) -> str:
        """What a correct completion of `prompt` reads (before the end-of-sequence token)."""
        return "\n".join([*self.steps(), f"{ANSWER_MARKER} {self.answer}"])


def chain_steps(value: int, operators: str, operands: Sequence[int]) -> list[str]:
    """Worked lines applying `operators` with `operands` to `value`, left to right."""
    lines = []
    for op, n in zip(operators, operands):
        result = value + n if op == "+" else value - n if op == "-" else value * n
        lines.append(f"{value}{op}{n}={result}")
        value = result
    return lines


def make_problems(count: int, seed: int, kinds: Sequence[str] = KINDS, split: int = 0) -> list[Problem]:
    """`count` problems drawn with their kinds uniform over `kinds`; `split` 0 and 1 are disjoint
    streams (training arrivals and held-out evaluation: no held-out problem is ever a training one)."""
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"problem kind {kind!r} is not one of {KINDS}")
    rng = np.random.default_rng([ARITHMETIC_STREAM, seed, split])
    problems, seen = [], set()
    while len(problems) < count:
        kind = kinds[int(rng.integers(len(kinds)))]
        numbers = [int(rng.integers(2, 10)) if kind[0] == "*" else int(rng.integers(10, 60))]
        numbers.append(int(rng.integers(2, 10)) if kind[0] == "*" else int(rng.integers(10, 60)))
        numbers += [int(rng.integers(1, 30)) for _ in kind[1:]]
        problem = Problem(tuple(numbers), kind)
        if _held_out(problem) != bool(split) or problem in seen:
            continue  # each problem belongs to one split, by its hash
        if any(int(step.rsplit("=", 1)[1]) == problem.answer for step in problem.steps()[:-1]):
            continue  # the hint (the first step) must not state the answer, even by coincidence
        seen.add(problem)
        problems.append(problem)
    return problems


def _held_out(problem: Problem) -> bool:
    return zlib.crc32(problem.prompt.encode()) % 5 == 0


def parse_answer(completion: str) -> int | None:
    """The integer after the first answer marker in a completion, or None if it has none."""
    match = _ANSWER.search(completion)
    return int(match.group(1)) if match else None


def is_correct(problem: Problem, completion: str) -> bool:
    """The verifier: the completion's answer equals the problem's (its working is not checked)."""
    return parse_answer(completion) == problem.answer


def hint(problem: Problem) -> str:
    """Partial feedback: the solution's first step, which never states the answer."""
    return problem.steps()[0]


def feedback(problem: Problem, completion: str) -> str:
    """What the client's environment says about a wrong completion: that it is wrong, and a hint."""
    given = parse_answer(completion)
    said = f"Your answer {given} is wrong." if given is not None else "Your answer has no final 'A:' line."
    return f"Incorrect. {said} Hint: {hint(problem)}"


def revision_prompt(problem: Problem, previous: str) -> str:
    """The prompt of a revision: the task, the previous answer and the feedback, then the task again."""
    previous = previous.strip().replace("\n", " ; ")[:120]
    return f"{problem.prompt}Previous: {previous}\n{feedback(problem, previous)}\n{problem.prompt}"
