"""The labeling page's configuration (`rlhf-ray label`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from rlhf_ray.config import GeneratorConfig
from rlhf_ray.config_loader import ConfigError, doc

LABEL_MODES = ("pairwise", "rating", "ranking", "ab")
_ANNOTATOR_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MIN_TOKEN_LENGTH = 16


def check_annotator_tokens(tokens: dict, where: str) -> None:
    """Names of letters, digits, `_.-`; tokens strings of >= MIN_TOKEN_LENGTH characters, all different."""
    for name, token in tokens.items():
        if not isinstance(name, str) or not _ANNOTATOR_NAME.match(name):
            raise ConfigError(f"{where}: annotator name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"{where}.{name}: the token must be a string of at least {MIN_TOKEN_LENGTH} "
                              "characters (make one with: python -c 'import secrets; print(secrets.token_urlsafe())')")
    if len(set(tokens.values())) < len(tokens):
        raise ConfigError(f"{where}: two annotators share a token; each needs their own")


@dataclass(frozen=True)
class LabelServerConfig:
    host: str = doc("Address the page is served on. 127.0.0.1 keeps it on this machine; 0.0.0.0 opens it to "
                    "the network over plain HTTP (put TLS in front).", "127.0.0.1")
    port: int = doc("TCP port.", 8000, ge=1, le=65535)
    annotators: dict = doc("Annotator name -> token; each annotator opens http://HOST:PORT/?token=TOKEN. With "
                           "neither this nor tokens_file, one annotator `local` gets a random token, printed at "
                           "start.", default_factory=dict)
    tokens_file: Optional[str] = doc("YAML or JSON file mapping annotator name -> token (keeps tokens out of "
                                     "configs), merged with annotators.", None)
    max_body_bytes: int = doc("Largest request body accepted; a larger one is refused with 413.", 16384,
                              ge=256, le=2**24)

    def __post_init__(self):
        check_annotator_tokens(self.annotators, "server.annotators")


@dataclass(frozen=True)
class ABConfig:
    name_a: str = doc("Name of model A in the summary (annotators never see it), e.g. rlhf.", "A")
    name_b: str = doc("Name of model B, e.g. sft. The summary reports the win rate of A over B.", "B")
    model_a: Optional[str] = doc("Model A, answering `prompts` with the vLLM generator (directory, hub name or "
                                 "tiny:<preset>); or give candidates_a.", None)
    model_b: Optional[str] = doc("Model B, like model_a; or give candidates_b.", None)
    candidates_a: Optional[str] = doc("Model A's answers: rows {prompt, response} (or {prompt, responses: "
                                      "[one]}), matched with B's by prompt.", None)
    candidates_b: Optional[str] = doc("Model B's answers, like candidates_a.", None)
    greedy: bool = doc("Answer greedily when generating (as every stage's evaluation does); false samples "
                       "with generator.temperature and top_p.", True)
    ties: Literal["half", "exclude"] = doc("Ties and 'both bad' in the win rate: half a win each (counted in "
                                           "n), or left out of it.", "half")

    def __post_init__(self):
        if self.name_a == self.name_b:
            raise ConfigError(f"ab.name_a and ab.name_b must differ, both are {self.name_a!r}")
        for side in ("a", "b"):
            if getattr(self, f"model_{side}") and getattr(self, f"candidates_{side}"):
                raise ConfigError(f"ab: give ab.model_{side} or ab.candidates_{side}, not both")


@dataclass(frozen=True)
class LabelConfig:
    """Collect human feedback: a local web page where annotators judge candidate responses."""

    mode: Literal["pairwise", "rating", "ranking", "ab"] = doc(
        "pairwise: which of two responses is better (or tie, both bad); rating: a score per response on "
        "rating_scale; ranking: order all responses best first; ab: blind A/B evaluation of two models.",
        "pairwise")
    candidates: Optional[str] = doc("Precomputed candidates: rows {prompt, responses: [...], models?: [...]} "
                                    "(.jsonl/.json/.parquet). In ab mode, rows whose models name ab.name_a and "
                                    "ab.name_b.", None)
    prompts: Optional[str] = doc("Prompts for `model` (or ab.model_a/b) to answer: rows {prompt}, {instruction, "
                                 "input?} or {messages}, as for RLHF.", None)
    model: Optional[str] = doc("Model that writes num_candidates responses per prompt with the vLLM generator "
                               "(directory, hub name or tiny:<preset>); its answers are saved to "
                               "<output_dir>/candidates.jsonl and reused on restart.", None)
    num_candidates: int = doc("Responses generated per prompt (2 for pairwise).", 2, ge=1, le=9)
    max_items: Optional[int] = doc("Label at most the first this many items; null: all.", None, ge=1)
    rating_scale: tuple[float, ...] = doc("[lo, hi] of rating scores (train with the same data.rating_scale).",
                                          (1.0, 5.0))
    rating_step: float = doc("Step between the rating values offered (lo, lo + step, ..., hi).", 1.0, gt=0.0)
    output_dir: str = doc("Directory of judgements.jsonl (every judgement, append-only), feedback.jsonl (the "
                          "latest judgement per annotator and item in reward-model format: `rlhf-ray rm` trains "
                          "on it) and candidates.jsonl (generated responses).", "labels")
    seed: int = doc("Seed of the order responses are shown in, of generation and of select: random.", 0, ge=0,
                    le=2**32 - 1)
    select: Literal["order", "random", "uncertainty"] = doc(
        "Order of the items (and which max_items are kept): order = as in the file; random = shuffled with "
        "seed; uncertainty = most informative for the reward model first: the smallest margin |r(a) - r(b)| "
        "with one model in select_models, the largest std of the margin across them with several (the "
        "closest pair of a ranking item). pairwise and ranking modes.", "order")
    select_models: tuple[str, ...] = doc(
        "Reward-model directories that score the candidates for select: uncertainty, e.g. the model/ of an "
        "`rlhf-ray rm` run; several (runs with other seeds or data) rank by their disagreement.", ())
    max_prompt_length: int = doc("Prompts longer than this many tokens are not generated for (counted).", 256,
                                 ge=1)
    ab: ABConfig = doc("A/B evaluation (mode ab).", default_factory=ABConfig)
    server: LabelServerConfig = doc("The web server.", default_factory=LabelServerConfig)
    generator: GeneratorConfig = doc("vLLM settings when a model answers the prompts (samples_per_prompt is "
                                     "not used: see num_candidates).", default_factory=GeneratorConfig)
    ray_address: Optional[str] = doc("Ray cluster to generate on; null starts a local instance.", None)
    num_cpus: Optional[int] = doc("Logical CPUs of the local Ray instance; null: the machine's core count.",
                                  None, ge=1)

    def __post_init__(self):
        scale = list(self.rating_scale)
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scale)
        if len(scale) != 2 or not numbers or not scale[0] < scale[1]:
            raise ConfigError(f"rating_scale: expected two numbers [lo, hi] with lo < hi, got {scale}")
        steps = (scale[1] - scale[0]) / self.rating_step
        if abs(steps - round(steps)) > 1e-6 or round(steps) > 100:
            raise ConfigError(f"rating_step: {self.rating_step:g} must divide rating_scale {scale} into at most "
                              "100 equal steps")
        self._check_sources()
        self._check_select()

    def _check_select(self) -> None:
        if self.select == "uncertainty" and not self.select_models:
            raise ConfigError("select_models: select: uncertainty needs at least one reward-model directory to "
                              "score the candidates with (the model/ of an `rlhf-ray rm` run)")
        if self.select_models and self.select != "uncertainty":
            raise ConfigError(f"select_models: only used with select: uncertainty (select is {self.select})")
        if self.select == "uncertainty" and self.mode not in ("pairwise", "ranking"):
            raise ConfigError(f"select: uncertainty ranks by reward margins between responses, for modes pairwise "
                              f"and ranking; mode {self.mode} needs select: order or random")

    def _check_sources(self) -> None:
        if self.model and not self.prompts:
            raise ConfigError("model: also give prompts (the file of prompts the model answers)")
        if self.mode == "ab":
            if self.model:
                raise ConfigError("mode ab: name the two models as ab.model_a and ab.model_b, not model")
            sides = [bool(getattr(self.ab, f"model_{s}") or getattr(self.ab, f"candidates_{s}")) for s in "ab"]
            if self.candidates and any(sides):
                raise ConfigError("mode ab: give candidates (rows naming both models) or ab.model_*/ab.candidates_*,"
                                  " not both")
            if not self.candidates and not all(sides):
                raise ConfigError("mode ab: give ab.model_a or ab.candidates_a, and ab.model_b or ab.candidates_b "
                                  "(or candidates with a models field)")
            if (self.ab.model_a or self.ab.model_b) and not self.prompts:
                raise ConfigError("mode ab: ab.model_a/ab.model_b answer `prompts`; give prompts")
            return
        if bool(self.candidates) == bool(self.model):
            raise ConfigError(f"mode {self.mode}: give candidates (a file of responses) or model and prompts "
                              "(to generate them), exactly one of the two")
        if self.model and self.mode == "pairwise" and self.num_candidates != 2:
            raise ConfigError(f"num_candidates: pairwise mode compares 2 responses, got {self.num_candidates} "
                              "(use mode=ranking for more)")
        if self.model and self.mode == "ranking" and self.num_candidates < 2:
            raise ConfigError("num_candidates: a ranking needs at least 2 responses")

    @property
    def scale_values(self) -> tuple[float, ...]:
        """The rating values offered: lo, lo + step, ..., hi."""
        lo, hi = float(self.rating_scale[0]), float(self.rating_scale[1])
        n = round((hi - lo) / self.rating_step)
        return tuple(round(lo + i * self.rating_step, 9) for i in range(n)) + (hi,)
