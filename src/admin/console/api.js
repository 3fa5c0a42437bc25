// The admin API as the page uses it: reads (open, like curl) and actions (with the bearer
// token the operator typed). The token lives in the password field and in `token()`'s caller
// only: never in storage, cookies or URLs.

/** What a read returned: `data` on success, `unavailable` (404) or `error` otherwise. */
export async function read(path) {
  let resp;
  try {
    resp = await fetch(path, { cache: 'no-store', headers: { Accept: 'application/json' } });
  } catch (e) {
    return { error: `cannot reach fwgate: ${e.message}` };
  }
  const body = await resp.text();
  let data = null;
  try {
    data = body ? JSON.parse(body) : null;
  } catch (e) {
    return { error: `${path} answered ${resp.status} with something that is not JSON` };
  }
  if (resp.status === 404) {
    return { unavailable: (data && data.error) || 'not found', status: 404 };
  }
  if (!resp.ok) {
    return { error: `${path} answered ${resp.status}: ${(data && data.error) || body}`, status: resp.status };
  }
  return { data, status: resp.status };
}

/** An error whose message is meant for the operator, as it is. */
export class ActionError extends Error {}

const TOKEN_HELP =
  'It is the content of the file named by [admin] token_file in fwgate.toml ' +
  '(or the FWGATE_ADMIN_TOKEN environment variable of the fwgate process).';

/**
 * Sends a mutating request with `Authorization: Bearer <token>`. Resolves with the parsed
 * answer; rejects with an ActionError that says what went wrong and what to do.
 */
export async function act(method, path, token, body) {
  if (!token) {
    throw new ActionError(
      `Nothing was sent: type the admin token in the field at the top of the page first. ${TOKEN_HELP}`);
  }
  const headers = { Authorization: `Bearer ${token}`, 'X-Fwgate-Actor': 'console' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
  } catch (e) {
    throw new ActionError(`Could not reach fwgate (${e.message}); nothing is known to have changed.`);
  }
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  const said = (data && data.error) || text.trim() || resp.statusText;
  if (resp.ok) return data;
  if (resp.status === 401) {
    throw new ActionError(
      `Refused (401 ${said}): the admin token typed at the top of the page is wrong. ${TOKEN_HELP} Nothing was changed.`);
  }
  if (resp.status === 403) {
    throw new ActionError(
      `Refused (403): this fwgate instance has no admin token configured, so nothing can be changed ` +
      `from this page or the CLI. The server says: ${said}`);
  }
  const note = data && data.note ? ` (${data.note})` : '';
  throw new ActionError(`fwgate answered ${resp.status}: ${said}${note}`);
}
