"""Multi-step arithmetic with worked solutions: the prompts of SPEAR's online fine-tuning, each with a
verifier (correct / incorrect) and feedback whose hint never states the answer.

A problem chains three or four small numbers with + - *, left to right (`37+48-19=?`); its worked
solution writes one step per line (`37+48=85`, `85-19=66`) and ends with the answer line `A: 66`.
The hint is every step of the solution but the last, which never states the answer: every problem
has two steps or more, and none whose intermediate result equals the answer is drawn. A problem's `kind` is its operator pattern (`+-`, `*+`, ...): clients' prompts are partitioned
by kind, so a client sees some patterns far more than others.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedmm.core.schema import RunConfig

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
        if any(int(step.rsplit("=", 1)[1]) == problem.answer for step in hinted_steps(problem)):
            continue  # the hint (the steps before the last) must not state the answer, even by coincidence
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


def hinted_steps(problem: Problem) -> list[str]:
    """What the hint reveals: the solution's lines but the last (the one that reaches the answer), as
    SPEAR's reference hints with the first lines of a worked solution."""
    return problem.steps()[:-1]


def hint(problem: Problem) -> str:
    """Partial feedback: the hinted steps, on one line."""
    return " ; ".join(hinted_steps(problem))


def hinted_working(problem: Problem) -> str:
    """The start of a correct completion that the hint reveals, as a completion writes it."""
    return "".join(line + "\n" for line in hinted_steps(problem))


def feedback(problem: Problem, completion: str) -> str:
    """What the client's environment says about a wrong completion: that it is wrong, and a hint."""
    given = parse_answer(completion)
    said = f"Your answer {given} is wrong." if given is not None else "Your answer has no final 'A:' line."
    return f"Incorrect. {said} Hint: {hint(problem)}"


def revision_prompt(problem: Problem, previous: str) -> str:
    """The prompt of a revision: the task, the previous answer and the feedback, then the task again."""
    shown = previous.strip().replace("\n", " ; ")[:120]  # the answer is read before a long one is cut
    return f"{problem.prompt}Previous: {shown}\n{feedback(problem, previous)}\n{problem.prompt}"


def _dataset(problems: Sequence[Problem]):
    from datasets import Dataset

    return Dataset.from_dict({"numbers": [list(p.numbers) for p in problems], "kind": [p.kind for p in problems],
                              "label": [KINDS.index(p.kind) for p in problems]})


def _problems(part) -> list[Problem]:
    return [Problem(tuple(n), k) for n, k in zip(part["numbers"], part["kind"])]


_PARTITIONS: dict[str, tuple] = {}


def client_problems(run: "RunConfig", partition_id: int) -> tuple[list[Problem], list[Problem]]:
    """Client `partition_id`'s prompts: its share of `data.examples_per_task` training problems (its
    arrivals are drawn from these) and of `data.test_fraction` as many held-out ones, both partitioned
    by kind with flwr-datasets (data.partitioner: Dirichlet(data.dirichlet_alpha) over kinds, or iid)."""
    from fedmm.data.scenes import make_partitioner

    key = str([asdict(run.data), run.seed, run.clients.num])
    if key not in _PARTITIONS:
        held_out = max(run.clients.num * 10, round(run.data.examples_per_task * run.data.test_fraction))
        pools = (make_problems(run.data.examples_per_task, run.seed), make_problems(held_out, run.seed, split=1))
        partitioners = []
        for pool in pools:
            partitioner = make_partitioner(run.data, run.clients.num, run.seed)
            partitioner.dataset = _dataset(pool)
            partitioners.append(partitioner)
        _PARTITIONS[key] = tuple(partitioners)
    train, test = (_problems(p.load_partition(partition_id)) for p in _PARTITIONS[key])
    return train, test
