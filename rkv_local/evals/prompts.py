"""The prompt the speed benchmarks decode from: a chat turn of built-in word problems."""
from __future__ import annotations

from .decoding import ChatTemplate

PROBLEMS = [
    "A train leaves a station at 9:00 travelling at 80 km/h. A second train leaves the same station at 10:30 "
    "on the same track at 120 km/h. When and where does the second train catch up?",
    "A shop sells pencils at 3 for $1.20 and pens at $0.85 each. Maya buys 12 pencils and 5 pens and pays with "
    "a $20 bill. How much change does she get?",
    "The sum of three consecutive odd integers is 147. What is the product of the smallest and the largest?",
    "A rectangle's length is 4 cm more than twice its width and its perimeter is 62 cm. Find its area.",
    "A tank fills in 6 hours through pipe A and in 9 hours through pipe B; pipe C empties it in 12 hours. "
    "Starting empty with all three open, how long until the tank is full?",
]
INSTRUCTION = "Solve every problem. Please reason step by step, and put each final answer within \\boxed{}."


def build_prompt(llm, target_tokens: int) -> list[int]:
    """A chat prompt of built-in word problems, about ``target_tokens`` long (at least one problem)."""
    template = ChatTemplate(llm)

    def render(content: str) -> list[int]:
        return template.tokens(template.render([{"role": "user", "content": content}]))

    problems: list[str] = []
    i = 0
    while True:
        problems.append(f"{len(problems) + 1}. {PROBLEMS[i % len(PROBLEMS)]}")
        i += 1
        tokens = render("\n".join(problems) + "\n\n" + INSTRUCTION)
        if len(tokens) >= target_tokens or len(problems) >= 10_000:
            return tokens
