import { useEffect, useRef, useSyncExternalStore } from 'react';
import { api, getSession, onSessionChange, roleAtLeast, setSession, type Role } from './api';
import { useLiveStatus } from './live';
import { Link, navigate, useLocation } from './router';
import { AlertsPage } from './pages/alerts-page';
import { AuditPage } from './pages/audit-page';
import { InfrastructurePage } from './pages/infrastructure-page';
import { KeysPage } from './pages/keys-page';
import { PoliciesPage } from './pages/policies-page';
import { UsersPage } from './pages/users-page';
import { DashboardPage } from './pages/dashboard-page';
import { JobPage, JobsPage } from './pages/jobs-page';
import { LoginPage } from './pages/login-page';
import { MachinePage } from './pages/machine-page';
import { MachinesPage } from './pages/machines-page';
import { ProtectPage } from './pages/protect-page';
import { FailoverPage } from './pages/failover-page';
import { RecoveryPage } from './pages/recovery-page';
import { RecoveryRunPage } from './pages/recovery-run-page';
import { TestFailoverPage } from './pages/test-failover-page';

const NAV: Array<{ to: string; label: string; min: Role }> = [
  { to: '/', label: 'Dashboard', min: 'viewer' },
  { to: '/machines', label: 'Machines', min: 'viewer' },
  { to: '/recovery', label: 'Recovery', min: 'viewer' },
  { to: '/alerts', label: 'Alerts', min: 'viewer' },
  { to: '/jobs', label: 'Jobs', min: 'viewer' },
  { to: '/policies', label: 'Policies', min: 'viewer' },
  { to: '/infrastructure', label: 'Infrastructure', min: 'viewer' },
  { to: '/audit', label: 'Audit log', min: 'operator' },
  { to: '/users', label: 'Users', min: 'admin' },
  { to: '/keys', label: 'Keys', min: 'admin' },
];

/** The portal: login when logged out, otherwise the layout with the page for the path. */
export function App() {
  const session = useSyncExternalStore(onSessionChange, getSession);
  const { path } = useLocation();
  const live = useLiveStatus();

  // After an in-app navigation, move focus to the new page's heading so keyboard and
  // screen-reader users know it changed (not on first load: Tab starts at the skip link).
  const firstPath = useRef(path);
  useEffect(() => {
    if (path !== firstPath.current) {
      firstPath.current = '';
      document.getElementById('page-title')?.focus();
    }
  }, [path]);

  if (session === null) return <LoginPage />;

  const logout = () => {
    void api('POST', '/api/auth/logout').catch(() => undefined);
    setSession(null);
    navigate('/');
  };

  const machine = /^\/machines\/([^/]+)$/.exec(path);
  const job = /^\/jobs\/([^/]+)$/.exec(path);
  const run = /^\/(test-failovers|failovers)\/([^/]+)$/.exec(path);
  let page;
  if (path === '/') page = <DashboardPage role={session.role} />;
  else if (path === '/machines') page = <MachinesPage role={session.role} />;
  else if (path === '/protect' && roleAtLeast(session.role, 'operator')) page = <ProtectPage />;
  else if (machine?.[1] !== undefined)
    page = <MachinePage id={decodeURIComponent(machine[1])} role={session.role} />;
  else if (path === '/recovery') page = <RecoveryPage role={session.role} />;
  else if (path === '/test-failover' && roleAtLeast(session.role, 'operator'))
    page = <TestFailoverPage />;
  else if (path === '/failover' && roleAtLeast(session.role, 'operator')) page = <FailoverPage />;
  else if (run?.[2] !== undefined)
    page = (
      <RecoveryRunPage
        kind={run[1] === 'failovers' ? 'failover' : 'test-failover'}
        id={decodeURIComponent(run[2])}
        role={session.role}
      />
    );
  else if (path === '/alerts') page = <AlertsPage role={session.role} />;
  else if (path === '/jobs') page = <JobsPage />;
  else if (path === '/policies') page = <PoliciesPage role={session.role} />;
  else if (path === '/infrastructure') page = <InfrastructurePage />;
  else if (path === '/audit' && roleAtLeast(session.role, 'operator')) page = <AuditPage />;
  else if (path === '/users' && roleAtLeast(session.role, 'admin')) page = <UsersPage />;
  else if (path === '/keys' && roleAtLeast(session.role, 'admin')) page = <KeysPage />;
  else if (job?.[1] !== undefined)
    page = <JobPage id={decodeURIComponent(job[1])} role={session.role} />;
  else
    page = (
      <>
        <h1 id="page-title" tabIndex={-1}>
          Not found
        </h1>
        <p>
          There is no page at {path}. Go to the <Link to="/">dashboard</Link>.
        </p>
      </>
    );

  const section = /^\/(test-failovers?|failovers?)(\/|$)/.test(path) ? '/recovery' : path;
  const active = (to: string) => (to === '/' ? path === '/' : section.startsWith(to));
  return (
    <>
      <a className="skip" href="#main">
        Skip to content
      </a>
      <header className="top">
        <span className="brand">Lifeboat</span>
        <nav aria-label="Main">
          <ul>
            {NAV.filter((n) => roleAtLeast(session.role, n.min)).map((n) => (
              <li key={n.to}>
                <Link to={n.to} aria-current={active(n.to) ? 'page' : undefined}>
                  {n.label}
                </Link>
              </li>
            ))}
          </ul>
        </nav>
        <div className="who">
          {live !== 'idle' ? (
            <span className={`live live-${live}`} title="How this page stays current">
              {live === 'live' ? 'Live' : 'Polling'}
            </span>
          ) : null}
          <span data-testid="who">
            {session.username} <span className="role">({session.role})</span>
          </span>
          <button type="button" onClick={logout}>
            Log out
          </button>
        </div>
      </header>
      <main id="main">{page}</main>
    </>
  );
}
