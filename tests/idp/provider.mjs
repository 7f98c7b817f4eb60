// =====================================================================================
//  TEST FIXTURE ONLY. NEVER DEPLOY THIS.
//
//  A local, certified OpenID Provider (`oidc-provider`) for kontext-broker's
//  integration tests. It accepts ANY login name and password, uses fixed test
//  secrets and cookie keys, keeps everything in memory, and exposes an
//  unauthenticated `POST /test/mint` route that hands out refresh tokens to
//  anyone who asks. It listens on 127.0.0.1 only.
//
//  Started by `tests/src/oidc_provider.rs`. Protocol with the launcher:
//    - env PORT (default 0 = the OS picks), ACCESS_TOKEN_TTL (seconds, default 5),
//      CONFIDENTIAL_CLIENT_SECRET (default: a fixed test value);
//    - prints exactly one line `READY http://127.0.0.1:PORT` on stdout once listening;
//    - exits when its stdin closes, so a killed test run leaves no orphan behind.
//  Test-only routes: `POST /test/mint` (a grant without login), `GET /test/stats`
//  (`{ refresh_token_grants, refresh_token_grant_errors, refresh_token_replays, ... }`
//  seen by this process) and
//  `POST /test/delete-access-token` (form `token`: that access token alone dies) and
//  `POST /test/hydra-rotation` (form `enabled`: delete the old access token on refresh),
//  `POST /test/client-secret` (form `client_id`, `client_secret`: change a dynamically
//  registered client's secret, as an admin rotating it would). `/test/stats` also has
//  `client_auth`: per client id, how many token/revocation/device calls came with
//  each client authentication method (`client_secret_basic`, `client_secret_post`,
//  `private_key_jwt`, `none`). Clients registered with `client_secret_post` get
//  `invalid_client` for HTTP Basic, as at Auth0 (oidc-provider alone accepts both).
// =====================================================================================

import http from 'node:http';

import Provider from 'oidc-provider';

const HOST = '127.0.0.1';
const port = Number.parseInt(process.env.PORT ?? '0', 10);
const accessTokenTtl = Number.parseInt(process.env.ACCESS_TOKEN_TTL ?? '5', 10);
const confidentialSecret = process.env.CONFIDENTIAL_CLIENT_SECRET
  ?? 'kontext-confidential-test-secret-not-for-production';

if (!Number.isInteger(port) || port < 0 || port > 65535) {
  throw new Error(`bad PORT ${process.env.PORT}`);
}
if (!Number.isInteger(accessTokenTtl) || accessTokenTtl <= 0) {
  throw new Error(`bad ACCESS_TOKEN_TTL ${process.env.ACCESS_TOKEN_TTL}`);
}

const DEVICE_CODE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';
const DAY = 24 * 60 * 60;

// Any account id exists; claims are derived from it.
async function findAccount(_ctx, sub) {
  return {
    accountId: sub,
    async claims() {
      return {
        sub,
        email: `${sub}@example.test`,
        email_verified: true,
        name: sub,
      };
    },
  };
}

// The issuer must carry the real port, which is only known after listen().
// So: bind a plain http server first, then build the provider with the bound URL.

const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, HOST, resolve);
});
const issuer = `http://${HOST}:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'kontext-cli',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      grant_types: ['authorization_code', 'refresh_token', DEVICE_CODE_GRANT],
      response_types: ['code'],
      // A native client accepts any loopback port for this redirect (RFC 8252 §7.3).
      redirect_uris: ['http://127.0.0.1:8765/callback'],
    },
    {
      // Fixed to client_secret_post although discovery lists both secret
      // methods, as Auth0 does per client: Basic is refused (see below).
      client_id: 'kontext-post',
      client_secret: confidentialSecret,
      application_type: 'native',
      token_endpoint_auth_method: 'client_secret_post',
      grant_types: ['authorization_code', 'refresh_token', DEVICE_CODE_GRANT],
      response_types: ['code'],
      redirect_uris: ['http://127.0.0.1:8765/callback'],
    },
    {
      client_id: 'kontext-confidential',
      client_secret: confidentialSecret,
      application_type: 'native',
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: ['authorization_code', 'refresh_token', DEVICE_CODE_GRANT],
      response_types: ['code'],
      redirect_uris: ['http://127.0.0.1:8765/callback'],
    },
  ],
  findAccount,
  scopes: ['openid', 'email', 'profile', 'offline_access'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name'],
  },
  // Expiry tests need exact lifetimes; the default keeps expired tokens alive 15 s more.
  clockTolerance: 0,
  ttl: {
    AccessToken: accessTokenTtl,
    AuthorizationCode: 60,
    DeviceCode: 600,
    IdToken: 3600,
    Interaction: 3600,
    Session: 14 * DAY,
    Grant: 14 * DAY,
    RefreshToken: 14 * DAY,
  },
  // Every refresh rotates, for confidential clients too (the default rotates
  // confidential clients' tokens only after 70% of their lifetime).
  rotateRefreshToken: true,
  // A refresh token for every client allowed the refresh_token grant, with or
  // without offline_access in the granted scope.
  issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    registration: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    userinfo: { enabled: true },
  },
  cookies: { keys: ['kontext-test-fixture-cookie-key-not-secret'] },
});

provider.on('server_error', (_ctx, err) => {
  console.error('oidc-provider server_error:', err);
});
// TEST-ONLY instrumentation, served at `GET /test/stats`: what the token
// endpoint saw, so tests can count refreshes at the IdP itself rather than trust
// the broker's own counters. Counters start at zero in every provider process.
const stats = {
  // Every `grant_type=refresh_token` request that reached the grant handler.
  refresh_token_grants: 0,
  refresh_token_grant_errors: 0,
};
provider.on('grant.success', (ctx) => {
  if (ctx.oidc?.params?.grant_type === 'refresh_token') stats.refresh_token_grants += 1;
});

provider.on('grant.error', (ctx, err) => {
  if (ctx.oidc?.params?.grant_type === 'refresh_token') {
    stats.refresh_token_grants += 1;
    stats.refresh_token_grant_errors += 1;
  }
  // Polling answers of the device flow are not errors worth a line.
  if (err.error === 'authorization_pending' || err.error === 'slow_down') return;
  console.error(`oidc-provider grant.error: ${err.error}: ${err.error_detail ?? err.error_description}`);
});

// TEST-ONLY: count replays, i.e. refresh grants presenting a refresh token that
// an earlier successful refresh already rotated away. Reuse revokes the whole
// grant here, so a correct broker never sends one.
stats.refresh_token_replays = 0;
const rotatedRefreshTokens = new Set();
provider.use(async (ctx, next) => {
  await next();
  const params = ctx.oidc?.params;
  if (ctx.method !== 'POST' || ctx.path !== '/token' || params?.grant_type !== 'refresh_token') {
    return;
  }
  const presented = String(params.refresh_token ?? '');
  if (rotatedRefreshTokens.has(presented)) stats.refresh_token_replays += 1;
  if (ctx.status === 200) rotatedRefreshTokens.add(presented);
});

// The device authorization response carries no `interval`, so clients would
// poll every 5 s (RFC 8628 default). Tests want 1 s.
provider.use(async (ctx, next) => {
  await next();
  if (
    ctx.method === 'POST'
    && ctx.path === '/device/auth'
    && ctx.status === 200
    && ctx.body
    && typeof ctx.body === 'object'
  ) {
    ctx.body = { ...ctx.body, interval: 1 };
  }
});

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) throw new Error('body too large');
    chunks.push(chunk);
  }
  const raw = Buffer.concat(chunks).toString('utf8');
  if ((req.headers['content-type'] ?? '').startsWith('application/json')) {
    return JSON.parse(raw || '{}');
  }
  return Object.fromEntries(new URLSearchParams(raw));
}

// TEST-ONLY, off by default: behave like Ory Hydra, which deletes the previous
// access token of a grant when a refresh rotates it, so requests still carrying
// it get 401 from then on. Switched with `POST /test/hydra-rotation` (form
// `enabled=true|false`). The deletion happens before the token response is
// sent, as in Hydra.
const hydraRotation = {
  enabled: false,
  // grantId -> the newest access token issued for it.
  latest: new Map(),
};
stats.access_tokens_deleted_on_rotation = 0;

provider.use(async (ctx, next) => {
  if (ctx.path === '/test/hydra-rotation') {
    if (ctx.method !== 'POST') {
      ctx.status = 405;
      return;
    }
    const params = await readBody(ctx.req);
    hydraRotation.enabled = params.enabled === 'true';
    ctx.status = 204;
    return;
  }
  await next();
  if (
    !hydraRotation.enabled
    || ctx.method !== 'POST'
    || ctx.path !== '/token'
    || ctx.status !== 200
    || ctx.oidc?.params?.grant_type !== 'refresh_token'
  ) {
    return;
  }
  const issued = ctx.oidc.entities.AccessToken;
  if (!issued?.grantId) return;
  const previous = hydraRotation.latest.get(issued.grantId);
  hydraRotation.latest.set(issued.grantId, ctx.body.access_token);
  if (previous) {
    const old = await provider.AccessToken.find(previous);
    if (old) {
      await old.destroy();
      stats.access_tokens_deleted_on_rotation += 1;
    }
  }
});

// TEST-ONLY instrumentation: which client authentication method each call to
// the token, revocation and device authorization endpoints carried, per client.
stats.client_auth = {};
provider.use(async (ctx, next) => {
  if (
    ctx.method === 'POST'
    && ['/token', '/token/revocation', '/device/auth'].includes(ctx.path)
  ) {
    // oidc-provider itself accepts either secret method from any secret
    // client. Auth0 and others fix the method per client: so does this fixture
    // for clients registered with client_secret_post, refusing HTTP Basic.
    const basic = ctx.get('authorization');
    if (basic.startsWith('Basic ')) {
      const decoded = Buffer.from(basic.slice(6), 'base64').toString('utf8');
      const id = decodeURIComponent(decoded.split(':')[0].replace(/\+/g, ' '));
      const client = await provider.Client.find(id);
      if (client?.tokenEndpointAuthMethod === 'client_secret_post') {
        stats.client_auth[id] ??= {};
        stats.client_auth[id].client_secret_basic = (stats.client_auth[id].client_secret_basic ?? 0) + 1;
        ctx.status = 401;
        ctx.set('WWW-Authenticate', 'Basic realm="oidc-provider"');
        ctx.body = {
          error: 'invalid_client',
          error_description: 'client authentication failed (this client must use client_secret_post)',
        };
        return;
      }
    }
    await next();
    // The parsed form (client auth fields are kept even when auth failed).
    const params = ctx.oidc?.params ?? {};
    let clientId = params.client_id;
    let method = 'none';
    const authz = ctx.get('authorization');
    if (authz.startsWith('Basic ')) {
      method = 'client_secret_basic';
      const decoded = Buffer.from(authz.slice(6), 'base64').toString('utf8');
      clientId = decodeURIComponent(decoded.split(':')[0].replace(/\+/g, ' '));
    } else if (params.client_assertion) {
      method = 'private_key_jwt';
    } else if (params.client_secret) {
      method = 'client_secret_post';
    }
    clientId ??= '?';
    stats.client_auth[clientId] ??= {};
    stats.client_auth[clientId][method] = (stats.client_auth[clientId][method] ?? 0) + 1;
    return;
  }
  await next();
});

// TEST-ONLY: change a dynamically registered client's secret, as an admin
// rotating it at the IdP would. Static clients cannot change; register one.
provider.use(async (ctx, next) => {
  if (ctx.path !== '/test/client-secret') {
    await next();
    return;
  }
  if (ctx.method !== 'POST') {
    ctx.status = 405;
    return;
  }
  const params = await readBody(ctx.req);
  const properties = await provider.Client.adapter.find(String(params.client_id ?? ''));
  if (!properties || !params.client_secret) {
    ctx.status = 404;
    return;
  }
  await provider.Client.adapter.upsert(params.client_id, {
    ...properties,
    client_secret: String(params.client_secret),
  });
  ctx.status = 204;
});

// TEST-ONLY: the counters above, as JSON.
provider.use(async (ctx, next) => {
  if (ctx.path !== '/test/stats') {
    await next();
    return;
  }
  ctx.set('Cache-Control', 'no-store');
  ctx.body = stats;
});

// TEST-ONLY: delete one access token and nothing else, as Hydra deletes the old
// access token when it rotates. (RFC 7009 revocation here would not do: this
// provider's revocation of an access token also revokes every token of its
// grant, the refresh token included.) Answers 204, or 404 for an unknown token.
provider.use(async (ctx, next) => {
  if (ctx.path !== '/test/delete-access-token') {
    await next();
    return;
  }
  if (ctx.method !== 'POST') {
    ctx.status = 405;
    return;
  }
  const params = await readBody(ctx.req);
  const token = await provider.AccessToken.find(String(params.token ?? ''));
  if (!token) {
    ctx.status = 404;
    return;
  }
  await token.destroy();
  ctx.status = 204;
});

// TEST-ONLY: mint a grant with an access token and a refresh token, without any
// login, and answer with an RFC 6749 §5.1 token response (plus an ID token
// signed with the provider's keys when the scope has `openid`).
provider.use(async (ctx, next) => {
  if (ctx.path !== '/test/mint') {
    await next();
    return;
  }
  if (ctx.method !== 'POST') {
    ctx.status = 405;
    return;
  }
  const params = await readBody(ctx.req);
  const clientId = params.client_id ?? 'kontext-cli';
  const scope = params.scope ?? 'openid offline_access';
  const accountId = params.sub ?? 'test-user';
  const client = await provider.Client.find(clientId);
  if (!client) {
    ctx.status = 400;
    ctx.body = { error: 'invalid_client', error_description: `unknown client ${clientId}` };
    return;
  }

  const grant = new provider.Grant({ accountId, clientId });
  grant.addOIDCScope(scope);
  const grantId = await grant.save();

  const common = {
    accountId, client, grantId, scope, gty: 'authorization_code',
  };
  const at = new provider.AccessToken(common);
  const accessToken = await at.save();
  hydraRotation.latest.set(grantId, accessToken);
  const rt = new provider.RefreshToken(common);
  const refreshToken = await rt.save();

  const body = {
    access_token: accessToken,
    token_type: 'Bearer',
    expires_in: at.expiration,
    refresh_token: refreshToken,
    scope,
  };
  if (grant.getOIDCScope().split(' ').includes('openid')) {
    const account = await findAccount(ctx, accountId);
    const idToken = new provider.IdToken(await account.claims(), { client });
    idToken.scope = grant.getOIDCScope();
    body.id_token = await idToken.issue({ use: 'idtoken' });
  }
  ctx.set('Cache-Control', 'no-store');
  ctx.body = body;
});

server.on('request', provider.callback());

// Exit with the parent: the launcher holds our stdin open for as long as it lives.
process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
process.stdin.resume();

process.stdout.write(`READY ${issuer}\n`);
