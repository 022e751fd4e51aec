import { useState, type FormEvent } from 'react';
import { api, ApiError, type Role } from '../api';
import { time } from '../format';
import { PagedTable } from '../paged-table';
import { Badge, ErrorBox, PageHeader } from '../ui';

interface User {
  id: string;
  username: string;
  role: Role;
  disabled: boolean;
  lastLoginAt: string | null;
}

// The vault's rules for a new user (user-routes.ts), checked as the admin types.
function check(field: 'username' | 'password', v: string): string | undefined {
  if (field === 'username') {
    if (v === '') return 'Enter a username.';
    if (v.length > 100) return 'At most 100 characters.';
    if (!/^[A-Za-z0-9._@-]+$/.test(v)) return 'Only letters, digits and . _ @ -';
    return undefined;
  }
  if (v.length < 8) return 'At least 8 characters.';
  return undefined;
}

/** Users and their roles; admins create users here. */
export function UsersPage() {
  const [username, setUsername] = useState('');
  const [password, setPassword] = useState('');
  const [role, setRole] = useState<Role>('viewer');
  const [touched, setTouched] = useState({ username: false, password: false });
  const [server, setServer] = useState<{ field?: string; error: ApiError }>();
  const [created, setCreated] = useState(0);
  const [done, setDone] = useState<string>();

  const err = (f: 'username' | 'password') =>
    (touched[f] ? check(f, f === 'username' ? username : password) : undefined) ??
    (server?.field === f ? server.error.message : undefined);

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setTouched({ username: true, password: true });
    setDone(undefined);
    if (check('username', username) !== undefined || check('password', password) !== undefined)
      return;
    try {
      await api('POST', '/api/users', { username, password, role });
      setDone(`User ${username} created as ${role}.`);
      setUsername('');
      setPassword('');
      setTouched({ username: false, password: false });
      setServer(undefined);
      setCreated((n) => n + 1);
    } catch (x) {
      if (x instanceof ApiError)
        setServer({ ...(x.field !== undefined ? { field: x.field } : {}), error: x });
    }
  };

  const field = (
    f: 'username' | 'password',
    label: string,
    type: string,
    value: string,
    set: (v: string) => void,
  ) => {
    const e = err(f);
    return (
      <div className="field inline">
        <label htmlFor={`new-${f}`}>{label}</label>
        <input
          id={`new-${f}`}
          type={type}
          autoComplete="off"
          value={value}
          aria-invalid={e !== undefined}
          aria-describedby={e !== undefined ? `new-${f}-error` : undefined}
          onChange={(x) => {
            set(x.target.value);
            setTouched((t) => ({ ...t, [f]: true }));
            setServer(undefined);
          }}
        />
        {e !== undefined ? (
          <p className="field-error" id={`new-${f}-error`}>
            {e}
          </p>
        ) : null}
      </div>
    );
  };

  return (
    <>
      <PageHeader title="Users" />
      <section className="card" aria-labelledby="new-user-h">
        <h2 id="new-user-h">New user</h2>
        <form className="toolbar" onSubmit={(e) => void submit(e)} noValidate>
          {field('username', 'Username', 'text', username, setUsername)}
          {field('password', 'Password', 'password', password, setPassword)}
          <div className="field inline">
            <label htmlFor="new-role">Role</label>
            <select id="new-role" value={role} onChange={(e) => setRole(e.target.value as Role)}>
              <option value="viewer">Viewer (reads everything, changes nothing)</option>
              <option value="operator">Operator (protects, fails over, acknowledges)</option>
              <option value="admin">Admin (also users, keys, credentials)</option>
            </select>
          </div>
          <button type="submit" className="primary">
            Create user
          </button>
        </form>
        {server !== undefined && server.field === undefined ? (
          <ErrorBox error={server.error} />
        ) : null}
        {done !== undefined ? (
          <p role="status" className="muted">
            {done}
          </p>
        ) : null}
      </section>
      <PagedTable<User>
        path="/api/users"
        caption="Users"
        testId="user-rows"
        reloadKey={created}
        columns={[
          { title: 'Username', cell: (u) => u.username },
          { title: 'Role', cell: (u) => u.role },
          {
            title: 'Status',
            cell: (u) => (
              <Badge
                value={u.disabled ? 'disabled' : 'active'}
                label={u.disabled ? 'Disabled' : 'Active'}
              />
            ),
          },
          { title: 'Last login', cell: (u) => time(u.lastLoginAt) },
        ]}
      />
    </>
  );
}
