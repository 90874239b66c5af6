"""Data as a user brings it: plain instructions, chat transcripts and preference pairs, no synthetic `task`.

Short texts (the tiny models have 512 positions), in every row form the loaders accept.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_ray.data.synthetic import write_jsonl

QA = [
    ("Name a primary colour.", "Red is a primary colour."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Give a synonym for happy.", "Cheerful."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Translate 'thank you' into Spanish.", "Gracias."),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
    ("Suggest a name for a cat.", "How about Miso?"),
    ("What is 7 times 6?", "7 times 6 is 42."),
    ("Write a haiku about rain.", "Soft rain on the roof,\nthe garden drinks quietly,\nclouds walk to the sea."),
    ("Which planet is known as the red planet?", "Mars."),
    ("Define the word 'ephemeral'.", "Lasting a very short time."),
    ("What does a thermometer measure?", "Temperature."),
    ("Give one tip for better sleep.", "Keep a regular bedtime."),
    ("What is the boiling point of water at sea level?", "100 degrees Celsius."),
    ("Summarise: the meeting moved to Friday.", "The meeting is now on Friday."),
    ("Is a tomato a fruit?", "Botanically, yes: it is a fruit."),
]
WORSE = "I don't know."


def write_user_data(out: Path) -> dict[str, Path]:
    """Files in `out`: prompts (mixed {prompt} / {messages} / {prompt: [messages]} rows), held-out prompts,
    SFT rows ({instruction, input, output}), and pairwise preferences."""
    prompts, sft, pairs = [], [], []
    for i, (question, answer) in enumerate(QA * 4):
        kind = i % 3
        if kind == 0:
            prompts.append({"prompt": question, "id": f"q{i}"})
        elif kind == 1:
            prompts.append({"messages": [{"role": "system", "content": "Answer briefly."},
                                         {"role": "user", "content": question}]})
        else:
            prompts.append({"prompt": [{"role": "user", "content": question}], "source": "chat"})
        sft.append({"instruction": question, "input": "", "output": answer})  # alpaca's form
        pairs.append({"prompt": question, "chosen": answer, "rejected": WORSE})
    return {
        "prompts": write_jsonl(prompts, out / "prompts.jsonl"),
        "prompts_eval": write_jsonl(prompts[:6], out / "prompts_eval.jsonl"),
        "sft": write_jsonl(sft, out / "sft.jsonl"),
        "preferences": write_jsonl(pairs, out / "preferences.jsonl"),
    }
