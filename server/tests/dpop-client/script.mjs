// panva's oauth4webapi (pinned in package.json / package-lock.json),
// unmodified, as a DPoP client of refresh-guard serve, driven by
// server/tests/server_dpop_client.rs: authorization code + PKCE + DPoP,
// three refreshes, the nonce round, and a refresh with another key.
//
// Env: RG_ISSUER, RG_REDIRECT_URI, RG_VERIFIER, RG_CODE (client `spa`,
// dpop = allowed), RG_NONCE_CODE (client `nonce-spa`, dpop_nonce = true),
// RG_ALG (ES256 or EdDSA; an EdDSA key signs its proofs as Ed25519).
import * as oauth from 'oauth4webapi'
import assert from 'node:assert/strict'
import { webcrypto } from 'node:crypto'

const insecure = { [oauth.allowInsecureRequests]: true } // http:// on loopback
const issuer = new URL(process.env.RG_ISSUER)
const redirectUri = process.env.RG_REDIRECT_URI
const verifier = process.env.RG_VERIFIER
const alg = process.env.RG_ALG

const as = await oauth.processDiscoveryResponse(issuer, await oauth.discoveryRequest(issuer, { algorithm: 'oauth2', ...insecure }))
assert.ok(as.dpop_signing_alg_values_supported.includes(alg), 'metadata lists the alg')

// RFC 7638 thumbprint of a public key, computed here from its JWK.
async function jkt(publicKey) {
  const jwk = await webcrypto.subtle.exportKey('jwk', publicKey)
  const members = jwk.kty === 'EC'
    ? { crv: jwk.crv, kty: jwk.kty, x: jwk.x, y: jwk.y }
    : { crv: jwk.crv, kty: jwk.kty, x: jwk.x }
  const digest = await webcrypto.subtle.digest('SHA-256', new TextEncoder().encode(JSON.stringify(members)))
  return Buffer.from(digest).toString('base64url')
}

function claims(accessToken) {
  return JSON.parse(Buffer.from(accessToken.split('.')[1], 'base64url').toString())
}

// One request, retried once when the server asks for a nonce: the DPoP
// handle keeps the DPoP-Nonce of the answer (RFC 9449 §8).
async function withNonceRetry(send, process) {
  try {
    return await process(await send())
  } catch (err) {
    if (oauth.isDPoPNonceError(err)) {
      console.log('  use_dpop_nonce: retrying with the server nonce')
      return { retried: true, ...(await process(await send())) }
    }
    throw err
  }
}

async function session(clientId, code, expectNonce) {
  const client = { client_id: clientId }
  const auth = oauth.None()
  const keyPair = await oauth.generateKeyPair(alg)
  const DPoP = oauth.DPoP(client, keyPair)
  const thumbprint = await jkt(keyPair.publicKey)
  const params = oauth.validateAuthResponse(as, client, new URL(`${redirectUri}?code=${code}`), oauth.expectNoState)
  let tokens = await withNonceRetry(
    () => oauth.authorizationCodeGrantRequest(as, client, auth, params, redirectUri, verifier, { DPoP, ...insecure }),
    (r) => oauth.processAuthorizationCodeResponse(as, client, r),
  )
  assert.equal(Boolean(tokens.retried), expectNonce, `${clientId}: nonce round at the exchange`)
  assert.equal(tokens.token_type, 'dpop')
  assert.equal(claims(tokens.access_token).cnf.jkt, thumbprint, 'cnf.jkt is the key thumbprint')
  for (let i = 1; i <= 3; i++) {
    const previous = tokens.refresh_token
    tokens = await withNonceRetry(
      () => oauth.refreshTokenGrantRequest(as, client, auth, previous, { DPoP, ...insecure }),
      (r) => oauth.processRefreshTokenResponse(as, client, r),
    )
    assert.ok(!tokens.retried, 'the cached nonce is current: no second round')
    assert.equal(tokens.token_type, 'dpop')
    assert.notEqual(tokens.refresh_token, previous, 'rotated')
    assert.equal(claims(tokens.access_token).cnf.jkt, thumbprint)
    console.log(`  ${clientId}: refresh ${i} ok`)
  }
  // Another key: the family is bound to the first.
  const otherKey = await oauth.generateKeyPair(alg)
  const other = oauth.DPoP(client, otherKey)
  await assert.rejects(
    withNonceRetry(
      () => oauth.refreshTokenGrantRequest(as, client, auth, tokens.refresh_token, { DPoP: other, ...insecure }),
      (r) => oauth.processRefreshTokenResponse(as, client, r),
    ),
    (err) => err instanceof oauth.ResponseBodyError && err.error === 'invalid_grant',
    'a refresh with another key is refused',
  )
  // ... and revoked nothing: the right key still refreshes.
  await withNonceRetry(
    () => oauth.refreshTokenGrantRequest(as, client, auth, tokens.refresh_token, { DPoP, ...insecure }),
    (r) => oauth.processRefreshTokenResponse(as, client, r),
  )
  console.log(`  ${clientId}: another key refused, the right one still works`)
}

await session('spa', process.env.RG_CODE, false)
await session('nonce-spa', process.env.RG_NONCE_CODE, true)
console.log(`oauth4webapi ${alg}: all checks passed`)
