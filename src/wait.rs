//! Waiting on a condition variable until a condition holds or a deadline
//! passes: the one deadline loop every blocking wait in the crate uses.

use std::sync::{Condvar, MutexGuard};
use std::time::Instant;

/// Waits on `cv` (whose mutex `guard` holds) until `done(&mut state)` is
/// true, or until `deadline` passes (`None`: no deadline). Returns the guard
/// and whether `done` held. A poisoned mutex is taken over: the state it
/// guards stays consistent wherever this crate uses it.
pub fn until<'a, T>(
    cv: &Condvar,
    mut guard: MutexGuard<'a, T>,
    deadline: Option<Instant>,
    mut done: impl FnMut(&mut T) -> bool,
) -> (MutexGuard<'a, T>, bool) {
    loop {
        if done(&mut guard) {
            return (guard, true);
        }
        guard = match deadline {
            None => cv.wait(guard).unwrap_or_else(|p| p.into_inner()),
            Some(t) => {
                let now = Instant::now();
                if now >= t {
                    return (guard, false);
                }
                cv.wait_timeout(guard, t - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[test]
    fn returns_when_done_or_at_the_deadline() {
        let pair = Arc::new((Mutex::new(0u32), Condvar::new()));
        let (m, cv) = &*pair;
        let (g, ok) = until(cv, m.lock().unwrap(), Some(Instant::now()), |n| *n > 0);
        assert!(!ok && *g == 0);
        drop(g);
        let p2 = pair.clone();
        let t = std::thread::spawn(move || {
            *p2.0.lock().unwrap() = 7;
            p2.1.notify_all();
        });
        let far = Instant::now() + Duration::from_secs(30);
        let (g, ok) = until(cv, m.lock().unwrap(), Some(far), |n| *n > 0);
        assert!(ok && *g == 7);
        drop(g);
        t.join().unwrap();
        let (g, ok) = until(cv, m.lock().unwrap(), None, |n| *n == 7);
        assert!(ok && *g == 7);
    }
}
