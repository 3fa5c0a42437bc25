//! The per-thread pool of relay buffers: a direction borrows one only while bytes are on
//! their way, so an idle tunnel holds none.

use std::cell::RefCell;

/// Size of a relay buffer: large enough for a WebSocket frame burst, small enough to pool.
pub const RELAY_BUFFER_BYTES: usize = 16 * 1024;
/// Buffers kept per worker thread; more are freed rather than hoarded.
const POOLED_BUFFERS_PER_THREAD: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    /// Buffers on loan on this thread, so tests can see that idle tunnels hold none.
    pub(super) static ON_LOAN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Times a relay write on this thread found the socket full and waited for room.
    pub(super) static WAITED_FOR_ROOM: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A relay buffer on loan from the per-thread pool; goes back when dropped.
pub(super) struct PooledBuffer(Option<Box<[u8]>>);

impl PooledBuffer {
    pub(super) fn take() -> PooledBuffer {
        let buf = POOL
            .with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; RELAY_BUFFER_BYTES].into_boxed_slice());
        #[cfg(test)]
        ON_LOAN.with(|n| n.set(n.get() + 1));
        PooledBuffer(Some(buf))
    }

    pub(super) fn as_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        #[cfg(test)]
        ON_LOAN.with(|n| n.set(n.get() - 1));
        if let Some(buf) = self.0.take() {
            POOL.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOLED_BUFFERS_PER_THREAD {
                    p.push(buf);
                }
            });
        }
    }
}
