/** The lease owner of jobs a component runs: the vault's runner never claims or resumes them. */
export function componentLeaseOwner(componentId: string): string {
  return `component:${componentId}`;
}
