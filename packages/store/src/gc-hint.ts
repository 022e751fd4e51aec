import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

let minorGc: ((options: { type: 'minor' }) => void) | null | undefined;

/**
 * Asks V8 for a young-generation collection now. A crypto thread's ciphertexts arrive here as
 * many 64 KiB buffers that are garbage as soon as they are copied into a pack; V8 frees them
 * only when enough external memory has piled up (tens of MiB), and the memory they came from
 * belongs to the thread's allocator, which the rest of the process cannot reuse. Collecting
 * the young generation every few MiB (about 50 us) keeps that pile small. A no-op where V8
 * does not allow it.
 */
export function collectYoungGarbage(): void {
  if (minorGc === undefined) {
    try {
      setFlagsFromString('--expose-gc');
      minorGc = runInNewContext('gc') as (options: { type: 'minor' }) => void;
    } catch {
      minorGc = null;
    }
  }
  minorGc?.({ type: 'minor' });
}
