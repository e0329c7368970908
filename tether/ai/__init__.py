"""AI feedback: a constitution of principles and an AI labeler of preference pairs (`tether ai label`).

    constitution.py  the principles (YAML), validated on load; the default set ships as default_constitution.yaml
    judge.py         the comparison prompt, the local HF judge (log-probabilities of the option tokens),
                     both-order debiasing, principle choice, and labelling a file into export-schema records
    compare.py       one comparison (the prompt a judge answers) and JudgeError
    http.py          the OpenAI-compatible HTTP judge: retries, timeout, concurrency, on-disk request cache
    critique.py      `tether ai critique-revise`: answer, critique, revise (Constitutional AI's supervised phase)
    reward.py        a direct AI reward for PPO (reward.fn): P(yes) per response, or against a reference answer
    cli.py           `tether ai label`, `tether ai critique-revise`
    convert.py       LLMBar (and its processed FairEval, LLMEval^2, MT-Bench) as preference records
    eval_labeler.py  `tether eval labeler`: agreement with human labels, flips, calibration, baselines, routing

Outside the algorithm core (tests/test_size.py); imports no torch until a local model is loaded.
"""
