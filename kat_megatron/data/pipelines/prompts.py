"""Default prompts of the data pipelines (each overridable per role with `ROLE.prompt`).

Templates are Python format strings; the fields each one receives are listed beside it. The
texts are ours: the KAT-V1 report does not publish its prompts.
"""

from __future__ import annotations

ANSWER_HINTS = {
    "math": "Put the final answer in \\boxed{}.",
    "multiple_choice": "End with 'The answer is (X)', X being the letter of your choice.",
    "code": "Give the complete program in one ```python code block.",
    "exact_match": "Give only the final answer.",
}
"""Appended to the query when sampling answers that a verifier will check."""

THINK_OFF_SYSTEM = (
    "Answer directly and concisely. Do not think step by step and do not show any reasoning."
)
"""Default system prompt of the think-off (direct) teacher."""

SAMPLE_PROMPT = "{query}\n\n{hint}"
"""Forced-mode samples and solver/direct answers. Fields: query, hint."""

JUDGE_VOTE_PROMPT = (
    "Decide whether answering the following query well requires explicit step-by-step "
    "reasoning, or whether a direct answer is enough.\n\nQuery:\n{query}\n\n"
    "Reply with exactly one word: THINK_ON (reasoning needed) or THINK_OFF (direct answer)."
)
"""Optional LLM-judge vote in `kat data tag`. Fields: query."""

THINKER_PROMPT = (
    "Here is a problem and its correct final answer.\n\nProblem:\n{query}\n\nFinal answer:\n"
    "{answer}\n\nWrite the step-by-step reasoning that a careful expert would think through to "
    "reach this answer, as if solving it for the first time: explore, check intermediate "
    "results, and end at the answer. Do not mention that the answer was given.{feedback}"
)
"""Think-on reasoning writer in `kat data synthesize`. Fields: query, answer, feedback."""

THINKER_FEEDBACK = "\n\nA reviewer criticised an earlier attempt:\n{critique}"

CRITIC_PROMPT = (
    "Rate the following reasoning for correctness, completeness and clarity.\n\nProblem:\n"
    "{query}\n\nReasoning:\n{reasoning}\n\nFinal answer:\n{answer}\n\nGive a short critique, "
    "then a last line of the form 'SCORE: N' with N an integer from 0 (useless) to 10 (perfect)."
)
"""Critic in `kat data synthesize`. Fields: query, reasoning, answer."""

INTENT_PROMPT = (
    "Classify the intent of this query as one of: {intents}.\n\nQuery:\n{query}\n\n"
    "Reply with the class name only."
)
"""Intent classifier in `kat data coldstart`. Fields: query, intents."""

JUDGE_WRITER_PROMPT = (
    "You are writing the short private judgement an assistant makes before answering, deciding "
    "whether to reason step by step. The query's intent is '{intent}'. The decision is: "
    "{decision}.\n\nQuery:\n{query}\n\nWrite one to three sentences, in the assistant's voice, "
    "explaining why this query {why}. Do not answer the query and do not mention these "
    "instructions."
)
"""Judge text writer in `kat data coldstart`. Fields: query, intent, decision, why."""

DECISIONS = {
    "think_on": ("think step by step (think-on)", "needs careful step-by-step reasoning"),
    "think_off": ("answer directly (think-off)", "can be answered directly without reasoning"),
}
"""mode -> (decision, why) phrases for JUDGE_WRITER_PROMPT."""
