"""A real OAuth 2.0 client library, unmodified, against `refresh-guard serve`.

Run by tests/server_authlib.rs, which starts the server, mints authorization
codes through the admin API (standing in for the embedding login) and passes
them here in the environment:

    RG_ISSUER         the server's issuer (its public base URL)
    RG_REDIRECT_URI   the redirect URI the codes were minted for
    RG_VERIFIER       the PKCE code verifier of every code
    RG_PUBLIC_CODES   two codes for the public client `spa`, comma-separated
    RG_BACKEND_CODE   one code for the confidential client `backend`
    RG_BACKEND_SECRET that client's secret

Everything goes through authlib's own requests integration: the PKCE code
exchange (fetch_token with code_verifier), refreshing (refresh_token, and the
automatic refresh of an expired token on a request), revocation
(revoke_token) and introspection (introspect_token). Exit status 0 means
every check passed; a failed check raises with a message.
"""

import os
import sys

import requests
from authlib.integrations.requests_client import OAuth2Session, OAuthError

ISSUER = os.environ["RG_ISSUER"]
REDIRECT_URI = os.environ["RG_REDIRECT_URI"]
VERIFIER = os.environ["RG_VERIFIER"]
PUBLIC_CODES = os.environ["RG_PUBLIC_CODES"].split(",")
BACKEND_CODE = os.environ["RG_BACKEND_CODE"]
BACKEND_SECRET = os.environ["RG_BACKEND_SECRET"]

SCOPE = "openid offline_access"


def step(msg):
    print("authlib: " + msg, flush=True)


def expect_oauth_error(fn, error, description=None):
    try:
        fn()
    except OAuthError as e:
        assert e.error == error, (e.error, e.description)
        if description is not None:
            assert e.description == description, e.description
        return e
    raise AssertionError("expected OAuth error " + error)


def main():
    meta = requests.get(ISSUER + "/.well-known/oauth-authorization-server", timeout=30).json()
    token_url = meta["token_endpoint"]
    revoke_url = meta["revocation_endpoint"]
    introspect_url = meta["introspection_endpoint"]
    assert "S256" in meta["code_challenge_methods_supported"], meta

    # 1. PKCE code exchange for a public client.
    updates = []
    client = OAuth2Session(
        client_id="spa",
        redirect_uri=REDIRECT_URI,
        scope=SCOPE,
        code_challenge_method="S256",
        token_endpoint_auth_method="none",
        token_endpoint=token_url,
        update_token=lambda token, refresh_token=None, access_token=None: updates.append(
            (token, refresh_token)
        ),
    )
    token = client.fetch_token(token_url, code=PUBLIC_CODES[0], code_verifier=VERIFIER)
    assert token["token_type"] == "Bearer", token
    assert token["refresh_token"].startswith("rgt_"), token
    assert token["scope"] == SCOPE, token
    assert token["expires_in"] > 0 and "expires_at" in token, token
    first = token["refresh_token"]
    step("code exchange with PKCE: ok")

    # 2. Refresh through authlib's refresh logic: rotation.
    token = client.refresh_token(token_url)
    second = token["refresh_token"]
    assert second != first, "refresh token was not rotated"
    assert client.token["refresh_token"] == second
    step("refresh rotates the refresh token: ok")

    # 3. Automatic refresh: with a leeway longer than the access token's
    # lifetime, authlib treats the token as expired and refreshes on its own
    # before the next request.
    client.leeway = 10 * 3600
    resp = client.get(ISSUER + "/healthz")
    assert resp.status_code == 200, resp.text
    third = client.token["refresh_token"]
    assert third not in (first, second), "automatic refresh did not rotate"
    assert updates and updates[-1][1] == second, updates
    client.leeway = 60
    step("automatic refresh on an expired token rotates: ok")

    # 4. Reuse: presenting a rotated-out token is invalid_grant, and the
    # family is revoked, so the latest token fails too.
    expect_oauth_error(
        lambda: client.refresh_token(token_url, refresh_token=first),
        "invalid_grant",
        "refresh token reuse detected; token family revoked",
    )
    expect_oauth_error(
        lambda: client.refresh_token(token_url, refresh_token=third),
        "invalid_grant",
        "refresh token has been revoked",
    )
    step("reuse of a rotated-out token is invalid_grant and revokes the family: ok")

    # 5. Revocation endpoint (RFC 7009), then refresh is invalid_grant.
    client2 = OAuth2Session(
        client_id="spa",
        redirect_uri=REDIRECT_URI,
        scope=SCOPE,
        code_challenge_method="S256",
        token_endpoint_auth_method="none",
        revocation_endpoint_auth_method="none",
    )
    token = client2.fetch_token(token_url, code=PUBLIC_CODES[1], code_verifier=VERIFIER)
    token = client2.refresh_token(token_url)
    resp = client2.revoke_token(revoke_url, token=token["refresh_token"], token_type_hint="refresh_token")
    assert resp.status_code == 200, (resp.status_code, resp.text)
    expect_oauth_error(
        lambda: client2.refresh_token(token_url),
        "invalid_grant",
        "refresh token has been revoked",
    )
    step("revocation endpoint, then refresh is invalid_grant: ok")

    # 6. A confidential client with client_secret_basic: exchange, refresh,
    # introspect, revoke.
    backend = OAuth2Session(
        client_id="backend",
        client_secret=BACKEND_SECRET,
        redirect_uri=REDIRECT_URI,
        code_challenge_method="S256",
        token_endpoint_auth_method="client_secret_basic",
        revocation_endpoint_auth_method="client_secret_basic",
    )
    token = backend.fetch_token(token_url, code=BACKEND_CODE, code_verifier=VERIFIER)
    old = token["refresh_token"]
    token = backend.refresh_token(token_url)
    assert token["refresh_token"] != old
    info = backend.introspect_token(introspect_url, token=token["refresh_token"]).json()
    assert info["active"] is True and info["client_id"] == "backend", info
    assert info["token_type"] == "refresh_token", info
    info = backend.introspect_token(introspect_url, token=token["access_token"]).json()
    assert info["active"] is True and info["client_id"] == "backend", info
    info = backend.introspect_token(introspect_url, token=old).json()
    assert info == {"active": False}, info
    resp = backend.revoke_token(revoke_url, token=token["refresh_token"])
    assert resp.status_code == 200, resp.text
    expect_oauth_error(lambda: backend.refresh_token(token_url), "invalid_grant")
    # A wrong secret is invalid_client.
    bad = OAuth2Session(
        client_id="backend",
        client_secret="wrong",
        token_endpoint_auth_method="client_secret_basic",
    )
    expect_oauth_error(lambda: bad.refresh_token(token_url, refresh_token=old), "invalid_client")
    step("confidential client (client_secret_basic), introspection, revocation: ok")

    print("authlib: all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
