"""A direct AI reward for PPO (RLAIF, Lee et al. 2023: the labeler scores responses during RL instead of
training a reward model first). A `reward.fn`:

    tether ppo ... reward.fn=tether.ai.reward:ai_judge 'reward.kwargs={model: runs/judge, principle: harmlessness}'
    tether ppo ... reward.fn=tether.ai.reward:ai_judge 'reward.kwargs={model: http://127.0.0.1:8000/v1, references: data/prompts.jsonl}'

Without references each response is judged alone: the score is the judge's P(Yes) to "Judged by this
principle, is the response good?" (tether.ai.compare.RATING; "Yes"/"yes" against "No"/"no" read from the
next-token logits as `tether ai label` reads A/B), averaged over the principles (principle: all, the
default, or one principle's name). With references (a prompt file whose records carry a `reference`
field, or another field named by reference_key), each response is compared with its prompt's reference
answer: the score is P(response better than the reference), both orders averaged (the labeler's
position-bias control), so 0.5 means "as good as the reference".

The judge (a local model folder or an OpenAI-compatible URL) and the references are loaded once per
process: the function runs on every PPO batch. A comparison that fails after the HTTP judge's retries
stops the run (a reward is never made up).
"""

from __future__ import annotations

from pathlib import Path

_JUDGES: dict[tuple, object] = {}
_REFS: dict[tuple, dict[str, str]] = {}


def _judge(model: str, rating: bool, device: str, batch_size: int, max_length: int, cache: str):
    from tether.ai.compare import OPTIONS, YES_NO
    from tether.ai.judge import make_judge

    key = (model if model.startswith(("http://", "https://")) else str(Path(model).resolve()), rating, device)
    if key not in _JUDGES:
        _JUDGES[key] = make_judge(model, device=device, batch_size=batch_size, max_length=max_length, cache=cache or None,
                                  options=YES_NO if rating else OPTIONS)
    return _JUDGES[key]


def _references(path: str, field: str) -> dict[str, str]:
    """prompt text (as PPO passes it to a reward function) -> the record's reference answer."""
    from tether.data import load_prompts
    from tether.data.records import DataError
    from tether.data.tokenize import prompt_text

    key = (str(Path(path).resolve()), field)
    if key not in _REFS:
        examples, _ = load_prompts(path)
        refs = {}
        for ex in examples:
            ref = ex.meta.get(field)
            if not isinstance(ref, str) or not ref.strip():
                raise DataError(f"{ex.loc}: no {field!r} field (a non-empty string) for the AI reward's reference answer")
            refs[prompt_text(ex.prompt)] = ref
        _REFS[key] = refs
    return _REFS[key]


def _fail(errors: list[str]):
    raise RuntimeError(f"tether.ai.reward: the judge failed on {len(errors)} response(s); first: {errors[0]}")


def ai_judge(prompts: list[str], responses: list[str], model: str = "", principle: str = "all", constitution: str = "",
             references: str = "", reference_key: str = "reference", both_orders: bool = True, device: str = "cpu",
             batch_size: int = 8, max_length: int = 1024, cache: str = "") -> list[float]:
    """The AI judge's score of each response in [0, 1] (see the module docstring)."""
    from tether.ai.compare import Rating
    from tether.ai.constitution import load_constitution
    from tether.ai.judge import Item, label
    from tether.config import ConfigError

    if not model:
        raise ConfigError("config key 'reward.kwargs': tether.ai.reward:ai_judge needs model (a judge model folder or an http(s):// URL)")
    c = load_constitution(constitution or None)
    if principle != "all":
        c.get(principle)
    if references:
        refs = _references(references, reference_key)
        missing = [p for p in prompts if p not in refs]
        if missing:
            raise ConfigError(f"config key 'reward.kwargs.references': {references} has no reference for the prompt {missing[0][:80]!r}")
        items = [Item(f"r{k}", (p, r, refs[p]), ("response", "reference")) for k, (p, r) in enumerate(zip(prompts, responses))]
        results = label(items, _judge(model, False, device, batch_size, max_length, cache), c, principle, both_orders)
        errors = [e for r in results for e in r.errors]
        if errors:
            _fail(errors)
        return [float(r.p) for r in results]
    principles = list(c.principles) if principle == "all" else [c.get(principle)]
    ratings = [Rating(p, r, pr) for p, r in zip(prompts, responses) for pr in principles]
    got = _judge(model, True, device, batch_size, max_length, cache).judge(ratings)
    errors = [str(g) for g in got if isinstance(g, Exception)]
    if errors:
        _fail(errors)
    n = len(principles)
    return [sum(got[k * n:(k + 1) * n]) / n for k in range(len(responses))]
