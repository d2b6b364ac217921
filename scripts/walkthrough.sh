#!/usr/bin/env bash
# The README's "Server" walkthrough, runnable: start the server from the
# repository root with `cargo run --release -- serve`, then, in another
# terminal, `scripts/walkthrough.sh` (or paste the README block). Needs
# curl, jq and openssl. The server's own variables (REFRESH_GUARD_LISTEN,
# REFRESH_GUARD_ADMIN_LISTEN, REFRESH_GUARD_DATA, REFRESH_GUARD_ADMIN_TOKEN)
# override the defaults, as they do for the server.
# server/tests/walkthrough.rs runs this script against the real binary and
# checks that the README block is the text below the marker.
set -euo pipefail
# ---- the README's walkthrough, from here to the end ----
API=http://${REFRESH_GUARD_LISTEN:-127.0.0.1:8080}              # public listener
ADMIN_API=http://${REFRESH_GUARD_ADMIN_LISTEN:-127.0.0.1:8081}  # admin listener
TOKEN=${REFRESH_GUARD_ADMIN_TOKEN:-$(cat "${REFRESH_GUARD_DATA:-data}/admin.token")}
# The admin token goes in a header read from stdin: never on a command line.
as_admin() { curl -sS -H @- "$@" <<<"Authorization: Bearer $TOKEN"; }
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
refresh() {
  curl -sS "$API/oauth2/token" -d grant_type=refresh_token \
    -d refresh_token="$1" -d client_id=spa
}

# 1. The client makes a PKCE pair (RFC 7636 §4.1, §4.2) and keeps the
#    verifier. (The library examples above use RFC 7636 Appendix B's pair.)
VERIFIER=$(openssl rand 32 | b64url)
CHALLENGE=$(printf %s "$VERIFIER" | openssl dgst -sha256 -binary | b64url)

# 2. Your login and consent are done: your server asks the admin API for a
#    code, and redirects the user agent to redirect_uri with it.
new_code() {
  as_admin "$ADMIN_API/admin/v1/authorizations" -d "$(jq -nc --arg c "$CHALLENGE" \
    '{client_id: "spa", subject: "user-42", scope: "openid offline_access",
      redirect_uri: "https://app.example/cb",
      code_challenge: $c, code_challenge_method: "S256"}')" | jq -er .code
}
CODE=$(new_code)

# 3. The client exchanges the code (with the verifier) for tokens.
exchange() {
  curl -sS "$API/oauth2/token" -d grant_type=authorization_code -d code="$1" \
    -d redirect_uri=https://app.example/cb -d client_id=spa \
    -d code_verifier="$VERIFIER" | jq -er .refresh_token
}
RT1=$(exchange "$CODE")
echo "exchange: refresh token ${RT1:0:4}... (${#RT1} characters)"

# 4. A refresh rotates: the answer carries the next refresh token.
RT2=$(refresh "$RT1" | jq -er .refresh_token)
echo "refresh: refresh token ${RT2:0:4}... (${#RT2} characters)"

# 5. The client lost that answer and retries with RT1 inside the grace
#    window (policies/default.toml: grace_period = "10s"): the same RT2.
AGAIN=$(refresh "$RT1" | jq -er .refresh_token)
echo "replay inside the grace window, same successor: $([ "$AGAIN" = "$RT2" ] && echo yes || echo no)"

# 6. After the window, RT1 again is reuse: the family is revoked, RT2 too.
sleep 11
echo "replay after the grace window: $(refresh "$RT1" | jq -c .)"
echo "its successor now: $(refresh "$RT2" | jq -c .)"

# 7. Introspection (RFC 7662) is on the public listener; here with the
#    admin token as the bearer (a confidential client may introspect its
#    own tokens with its secret).
RT=$(exchange "$(new_code)")
echo "introspect: $(as_admin "$API/oauth2/introspect" -d token="$RT" | jq -c '{active, client_id, sub}')"

# 8. Revocation (RFC 7009) by the public client, which names itself:
#    200 and an empty body, whatever the token.
curl -sS "$API/oauth2/revoke" -d token="$RT" -d client_id=spa \
  -o /dev/null -w 'revoke: HTTP %{http_code}, %{size_download} bytes\n'
echo "introspect after revoke: $(as_admin "$API/oauth2/introspect" -d token="$RT" | jq -c .)"

# 9. Metrics (admin listener), health (either), a policy reload (admin).
as_admin "$ADMIN_API/metrics" |
  grep -E '^refresh_guard_decisions_total\{client="spa",outcome="(rotated|grace_replay|reuse_detected)"'
echo "healthz: $(curl -sS "$API/healthz" | jq -c .)"
echo "reload: $(as_admin -X POST "$ADMIN_API/admin/v1/policies/reload" | jq -c .)"
