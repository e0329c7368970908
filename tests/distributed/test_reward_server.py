"""The reward service: HTTP scores equal the in-process reward model's; the client is a reward.fn."""

import threading

import pytest
import torch

from tether.backends.reward_server import RewardScorer, http_reward, make_server


def test_http_reward_matches_local_scores(tiny_gpt2):
    scorer = RewardScorer(str(tiny_gpt2), batch_size=2)
    server = make_server(scorer, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/score"
        prompts, responses = ["the movie was", "a film", "hello"], [" good", " bad and boring", " world"]
        remote = http_reward(prompts, responses, url=url)
        local = scorer(prompts, responses)
        assert torch.allclose(torch.tensor(remote), torch.tensor(local), atol=1e-6)
        with pytest.raises(RuntimeError, match="HTTP 400"):
            http_reward(["a"], [], url=url)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(RuntimeError, match="unreachable"):
        http_reward(["a"], ["b"], url=url, timeout=2)
