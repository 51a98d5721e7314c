//! A site's upload of a 100M-parameter update, streamed: DP-encoded, masked with real SecAgg+
//! masks and packed one segment at a time. It must send exactly the bytes the whole-vector path
//! sends, and hold no more than a stated bound beyond the update while it does.
//!
//! A counting allocator measures every heap byte this test binary holds, so the bound is
//! checked exactly, not through the process's resident size.

mod secagg_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use quorum_crypto::digest::sha256;
use quorum_crypto::dp::{DpParams, StreamEncoder, encode};
use quorum_crypto::packing::pack;
use quorum_crypto::prg::{default_threads, mask_parallel};
use quorum_crypto::secagg::Masker;
use quorum_crypto::upload::InputStream;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn held(bytes: usize) {
    let now = HELD.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// The one way to count heap bytes exactly. SAFETY: every call forwards to the system allocator
// unchanged; the counters only observe.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        held(layout.size());
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        held(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        held(new_size);
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const DIM: usize = 100_000_000;
/// Not a whole number of bytes per value: chunk boundaries fall inside bytes.
const BITS: u32 = 20;
/// Values per upload chunk at 20 bits (what `quorum_proto::elements_per_chunk` gives).
const PER_CHUNK: usize = (1 << 21) / 20;
const TAIL: [u32; 4] = [7, 0, 1 << 19, 3];

/// Client 0's masker in an honest three-client round over `len` values.
fn masker(len: usize) -> Masker {
    let ctx = secagg_support::context(3, 2, 2, 2, BITS, len);
    let secagg_support::Advertised {
        mut server,
        clients,
        lists,
        mut rng,
        auth,
    } = secagg_support::advertised(&ctx, 17);
    let mut next = Vec::new();
    for ((c, list), state) in lists.into_iter().zip(clients) {
        let (state, shares) = state.handle_peer_keys(list, &auth, &mut rng).unwrap();
        server.handle_share_keys(c, shares).unwrap();
        next.push(state);
    }
    let (_, shares) = server.close_share_keys().unwrap().swap_remove(0);
    next.swap_remove(0).handle_forwarded_shares(shares).unwrap()
}

#[test]
fn a_streamed_100m_upload_stays_within_its_bound_and_sends_the_whole_paths_bytes() {
    let params = DpParams::choose(DIM, 3, 2, 1.0, 0.5, BITS).unwrap();
    let update: Vec<f32> = (0..DIM)
        .map(|i| ((i % 1013) as f32 - 506.0) * 1e-6)
        .collect();
    let masker = masker(params.padded_dim + TAIL.len());
    let seed = [3u8; 32];

    // The whole-vector path: encode, append the tail, mask, pack in chunks.
    let expected: Vec<([u8; 32], usize)> = {
        let mut rng = ChaCha20Rng::from_seed([1; 32]);
        let mut values = encode(&update, &params, &seed, &mut rng).unwrap();
        values.extend(TAIL);
        mask_parallel(&mut values, default_threads(), |at, c| masker.mask(at, c));
        values
            .chunks(PER_CHUNK)
            .map(|c| (sha256(&pack(BITS, c)), c.len()))
            .collect()
    };

    // Streamed, counting every byte held beyond the update from here on.
    let before = HELD.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let mut rng = ChaCha20Rng::from_seed([1; 32]);
    let encoder = StreamEncoder::new(update, &params, &seed, &mut rng).unwrap();
    let stream = InputStream::new(Some(encoder), TAIL.to_vec(), BITS).masked(masker.input_mask());
    let mut sent = 0;
    stream
        .for_each_chunk(PER_CHUNK, |chunk| {
            let (digest, len) = expected[sent];
            assert_eq!(chunk.elements as usize, len, "chunk {sent}");
            assert_eq!(chunk.offset as usize, sent * PER_CHUNK, "chunk {sent}");
            assert_eq!(sha256(&chunk.packed), digest, "chunk {sent} differs");
            assert_eq!(chunk.last, sent + 1 == expected.len(), "chunk {sent}");
            sent += 1;
            Ok::<_, ()>(())
        })
        .unwrap();
    assert_eq!(sent, expected.len());
    let extra = PEAK.load(Ordering::Relaxed) - before;

    // One segment (threads × 2^20 coordinates: f64 rotation, u32 values), one noise batch
    // (2^20 i64), one chunk being filled and one packed: about 39 MiB on two cores, against
    // 12 bytes per parameter (1.2 GB here) for the whole-vector path.
    let segment = default_threads() * (1 << 20);
    let bound = segment * (8 + 4) + (1 << 20) * 8 + PER_CHUNK * 4 + (1 << 20) + (4 << 20);
    eprintln!(
        "streamed upload of {DIM} parameters: {:.1} MiB beyond the update (bound {:.1} MiB)",
        extra as f64 / 1048576.0,
        bound as f64 / 1048576.0
    );
    assert!(
        extra <= bound,
        "held {extra} bytes beyond the update; bound {bound}"
    );
}
