import { useState, type FormEvent } from 'react';
import { api, ApiError, setSession, type Role } from '../api';

// The same rules as the vault's login schema, so mistakes show while typing.
const USERNAME = /^[A-Za-z0-9._@-]+$/;

function usernameError(v: string): string | undefined {
  if (v === '') return 'Enter your username.';
  if (v.length > 100) return 'A username has at most 100 characters.';
  if (!USERNAME.test(v)) return 'A username has only letters, digits and . _ @ -';
  return undefined;
}

function passwordError(v: string): string | undefined {
  return v === '' ? 'Enter your password.' : undefined;
}

/** Log in with a username and password; the token lives in this tab's sessionStorage. */
export function LoginPage() {
  const [username, setUsername] = useState('');
  const [password, setPassword] = useState('');
  const [touched, setTouched] = useState({ username: false, password: false });
  const [serverError, setServerError] = useState<{ field: string; message: string }>();
  const [busy, setBusy] = useState(false);

  const userErr =
    (touched.username ? usernameError(username) : undefined) ??
    (serverError?.field === 'username' ? serverError.message : undefined);
  const passErr =
    (touched.password ? passwordError(password) : undefined) ??
    (serverError?.field === 'password' ? serverError.message : undefined);
  const formErr = serverError?.field === 'form' ? serverError.message : undefined;

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setTouched({ username: true, password: true });
    if (usernameError(username) !== undefined || passwordError(password) !== undefined) {
      document.getElementById(usernameError(username) ? 'username' : 'password')?.focus();
      return;
    }
    setBusy(true);
    setServerError(undefined);
    try {
      const r = await api<{
        token: string;
        expiresAt: string;
        user: { username: string; role: Role };
      }>('POST', '/api/auth/login', { username, password });
      setSession({
        token: r.token,
        username: r.user.username,
        role: r.user.role,
        expiresAt: r.expiresAt,
      });
    } catch (err) {
      if (err instanceof ApiError && err.code === 'LB_VAULT_LOGIN_FAILED') {
        // The vault does not say which one is wrong, on purpose; the message goes by the password.
        setServerError({ field: 'password', message: 'Wrong username or password.' });
        document.getElementById('password')?.focus();
      } else if (err instanceof ApiError && err.field !== undefined) {
        setServerError({ field: err.field, message: err.message });
      } else {
        setServerError({
          field: 'form',
          message: err instanceof ApiError ? `${err.message} (${err.code})` : String(err),
        });
      }
    } finally {
      setBusy(false);
    }
  };

  return (
    <main id="main" className="login">
      <form onSubmit={(e) => void submit(e)} noValidate aria-labelledby="page-title">
        <h1 id="page-title" tabIndex={-1}>
          Lifeboat
        </h1>
        <p className="muted">Log in to the vault.</p>
        <div className="field">
          <label htmlFor="username">Username</label>
          <input
            id="username"
            name="username"
            autoComplete="username"
            autoFocus
            value={username}
            aria-invalid={userErr !== undefined}
            aria-describedby={userErr !== undefined ? 'username-error' : undefined}
            onChange={(e) => {
              setUsername(e.target.value);
              setTouched((t) => ({ ...t, username: true }));
              setServerError(undefined);
            }}
          />
          {userErr !== undefined ? (
            <p className="field-error" id="username-error">
              {userErr}
            </p>
          ) : null}
        </div>
        <div className="field">
          <label htmlFor="password">Password</label>
          <input
            id="password"
            name="password"
            type="password"
            autoComplete="current-password"
            value={password}
            aria-invalid={passErr !== undefined}
            aria-describedby={passErr !== undefined ? 'password-error' : undefined}
            onChange={(e) => {
              setPassword(e.target.value);
              setTouched((t) => ({ ...t, password: true }));
              setServerError(undefined);
            }}
          />
          {passErr !== undefined ? (
            <p className="field-error" id="password-error" role="alert">
              {passErr}
            </p>
          ) : null}
        </div>
        {formErr !== undefined ? (
          <p className="error-box" role="alert">
            {formErr}
          </p>
        ) : null}
        <button type="submit" className="primary" disabled={busy}>
          {busy ? 'Logging in…' : 'Log in'}
        </button>
      </form>
    </main>
  );
}
