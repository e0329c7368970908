"""The VADER sentiment judge (Hutto & Gilbert 2014): the compound polarity of each response, in [-1, 1].

The lexicon ships inside the `vaderSentiment` wheel, so it works offline. It judges the response only;
the prompt is ignored (a positive continuation of a negative prompt still scores positive).
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise RuntimeError("the vader judge needs vaderSentiment: pip install vaderSentiment==3.3.2") from None
    return SentimentIntensityAnalyzer()


def vader_compound(texts: list[str]) -> list[float]:
    a = _analyzer()
    return [float(a.polarity_scores(t)["compound"]) for t in texts]


def vader_judge(prompts: list[str], responses: list[str]) -> list[float]:
    return vader_compound(responses)
