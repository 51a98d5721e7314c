//! Work on chunks of a slice spread over threads, with results in chunk order. Chunk `i`
//! always gets index `i`, whatever the number of threads, so work that seeds its randomness
//! by chunk index gives the same output on any machine.

use std::num::NonZeroUsize;

/// Runs `work(i, chunk)` on every `chunk_len`-long chunk of `data` (the last may be shorter),
/// spread over `threads` threads; returns the results in chunk order.
pub(crate) fn in_parallel<T: Send, O: Send>(
    data: &mut [T],
    chunk_len: usize,
    threads: NonZeroUsize,
    work: impl Fn(usize, &mut [T]) -> O + Sync,
) -> Vec<O> {
    let chunks: Vec<(usize, &mut [T])> = data.chunks_mut(chunk_len).enumerate().collect();
    if threads.get() == 1 || chunks.len() == 1 {
        return chunks.into_iter().map(|(i, c)| work(i, c)).collect();
    }
    let mut per_thread: Vec<Vec<(usize, &mut [T])>> =
        (0..threads.get()).map(|_| Vec::new()).collect();
    for (i, chunk) in chunks {
        per_thread[i % threads.get()].push((i, chunk));
    }
    let work = &work;
    let mut results: Vec<(usize, O)> = std::thread::scope(|scope| {
        let handles: Vec<_> = per_thread
            .into_iter()
            .map(|mine| {
                scope.spawn(move || {
                    mine.into_iter()
                        .map(|(i, c)| (i, work(i, c)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            // A panic in `work` is a bug; carry it to the caller's thread.
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, o)| o).collect()
}
