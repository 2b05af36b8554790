"""Guessing the admin token: wrong tokens from one address are answered 429 for a while, logged and counted."""

from __future__ import annotations

from support.harness import ADMIN, GatewayFactory
from support.upstream_fake import FakeUpstream

WRONG = {"Authorization": "Bearer " + "w" * 20 + "rong-token-0123456789"}


class TestAdminGuessing:
    def test_repeated_wrong_tokens_are_locked_out(
        self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory
    ) -> None:
        """Ten wrong tokens get 401 each; then even the right token is 429 too_many_auth_failures with Retry-After,
        without being compared; the lockout is logged and counted once."""
        gw = make_gateway(fake_upstream.url)
        for _ in range(10):
            response = gw.client.get("/gateway/keys", headers=WRONG)
            assert (response.status_code, response.json()["error"]["code"]) == (401, "invalid_admin_token")
        for headers in (WRONG, ADMIN):
            response = gw.client.get("/gateway/keys", headers=headers)
            assert (response.status_code, response.json()["error"]["code"]) == (429, "too_many_auth_failures")
            assert 1 <= int(response.headers["retry-after"]) <= 300
        assert gw.metric("kling_gateway_admin_auth_lockouts_total", {"surface": "admin_api"}) == 1
        (logged,) = [line for line in gw.log_lines() if line.get("event") == "admin_auth_locked_out"]
        assert logged["level"] == "warning"

    def test_right_token_clears_the_count(self, fake_upstream: FakeUpstream, make_gateway: GatewayFactory) -> None:
        """Mistyping now and then never locks an operator out: the right token resets the count."""
        gw = make_gateway(fake_upstream.url)
        for _ in range(5):
            for _ in range(9):
                assert gw.client.get("/gateway/keys", headers=WRONG).status_code == 401
            assert gw.client.get("/gateway/keys", headers=ADMIN).status_code == 200
