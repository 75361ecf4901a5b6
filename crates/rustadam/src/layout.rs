//! Strided views over memory: what a view touches, whether it is dense, and which views overlap.
//!
//! Hosts that hand foreign memory to the kernel (the Python bindings, say) use these pure
//! functions to decide, before anything is written, whether a buffer can be a slice as it is,
//! and which buffers of a call share memory.

use smallvec::SmallVec;

/// The element offsets a strided view reaches, relative to its first element: `(lowest,
/// highest)`, both inclusive, or `None` when the view has no element. A view whose reach does
/// not fit in `isize` gives `(isize::MIN, isize::MAX)`: it fits in no memory.
///
/// ```
/// use rustadam::layout::offset_range;
/// assert_eq!(offset_range(&[2, 3], &[3, 1]), Some((0, 5)));
/// assert_eq!(offset_range(&[4], &[-2]), Some((-6, 0)));
/// assert_eq!(offset_range(&[0, 3], &[3, 1]), None);
/// assert_eq!(offset_range(&[3], &[isize::MAX]), Some((isize::MIN, isize::MAX)));
/// ```
///
/// # Panics
/// If `shape` and `strides` differ in length (a malformed view).
pub fn offset_range(shape: &[usize], strides: &[isize]) -> Option<(isize, isize)> {
    same_rank(shape, strides);
    if shape.contains(&0) {
        return None;
    }
    let reach = || -> Option<(isize, isize)> {
        let (mut lo, mut hi) = (0isize, 0isize);
        for (&n, &s) in shape.iter().zip(strides) {
            let reach = isize::try_from(n - 1).ok()?.checked_mul(s)?;
            if reach < 0 {
                lo = lo.checked_add(reach)?;
            } else {
                hi = hi.checked_add(reach)?;
            }
        }
        Some((lo, hi))
    };
    Some(reach().unwrap_or((isize::MIN, isize::MAX)))
}

/// Every view helper takes one stride per dimension; zipping unequal lists would silently
/// answer for a truncated view.
fn same_rank(shape: &[usize], strides: &[isize]) {
    assert_eq!(
        shape.len(),
        strides.len(),
        "a view needs one stride per dimension: shape {shape:?}, strides {strides:?}"
    );
}

/// The dimensions that place elements (length > 1), as `(|stride|, length, stride)` sorted by
/// `|stride|`.
fn placing(shape: &[usize], strides: &[isize]) -> SmallVec<[(usize, usize, isize); 8]> {
    // Inline: called for every buffer of every step.
    let mut dims: SmallVec<[(usize, usize, isize); 8]> = shape
        .iter()
        .zip(strides)
        .filter(|(&n, _)| n > 1)
        .map(|(&n, &s)| (s.unsigned_abs(), n, s))
        .collect();
    dims.sort_unstable();
    dims
}

/// True when the elements fill consecutive slots exactly once in increasing order of some
/// permutation of the dimensions: the strides of the dimensions longer than 1, sorted, are
/// 1, n0, n0·n1, … (all positive). Such a view is a plain slice of `numel` elements.
///
/// ```
/// use rustadam::layout::is_dense;
/// assert!(is_dense(&[2, 3], &[3, 1]));      // contiguous
/// assert!(is_dense(&[2, 3], &[1, 2]));      // transposed
/// assert!(!is_dense(&[2, 3], &[6, 2]));     // every other element
/// assert!(!is_dense(&[3], &[-1]));          // reversed
/// ```
///
/// # Panics
/// If `shape` and `strides` differ in length (a malformed view).
pub fn is_dense(shape: &[usize], strides: &[isize]) -> bool {
    same_rank(shape, strides);
    // The usual case, row-major, needs no sort (this runs for every buffer of every step).
    let row_major = shape.iter().zip(strides).rev().filter(|(&n, _)| n > 1);
    fills_consecutive_slots(row_major.map(|(&n, &s)| (n, s)))
        || fills_consecutive_slots(placing(shape, strides).into_iter().map(|(_, n, s)| (n, s)))
}

/// Whether dimensions `(length, stride)`, innermost first, have the strides 1, n0, n0·n1, …
fn fills_consecutive_slots(dims: impl Iterator<Item = (usize, isize)>) -> bool {
    let mut expected = 1usize;
    for (n, s) in dims {
        if s <= 0 || s as usize != expected {
            return false;
        }
        expected = match expected.checked_mul(n) {
            Some(e) => e,
            None => return false,
        };
    }
    true
}

/// True when no two elements of the view share a memory slot, proven by the sufficient test
/// torch uses: sorted by |stride|, each stride exceeds the furthest reach of the smaller ones.
/// A view it cannot prove (some interleavings) counts as overlapping, which is safe for a view
/// that is written.
///
/// ```
/// use rustadam::layout::is_non_overlapping;
/// assert!(is_non_overlapping(&[2, 3], &[6, 2]));
/// assert!(!is_non_overlapping(&[2, 3], &[0, 1]));   // expanded
/// assert!(!is_non_overlapping(&[3, 3], &[1, 1]));   // diagonal windows
/// ```
///
/// # Panics
/// If `shape` and `strides` differ in length (a malformed view).
pub fn is_non_overlapping(shape: &[usize], strides: &[isize]) -> bool {
    same_rank(shape, strides);
    let mut reach = 0usize;
    for (abs, n, _) in placing(shape, strides) {
        if abs <= reach {
            return false;
        }
        reach = match abs.checked_mul(n - 1).and_then(|r| r.checked_add(reach)) {
            Some(r) => r,
            None => return false,
        };
    }
    true
}

/// The strides of a contiguous (row-major) view of `shape`, in elements.
///
/// ```
/// use rustadam::layout::row_major_strides;
/// assert_eq!(row_major_strides(&[2, 3, 4]), vec![12, 4, 1]);
/// ```
pub fn row_major_strides(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![1isize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1].saturating_mul(shape[d + 1].max(1) as isize);
    }
    strides
}

/// The dimensions of a dense view from the largest stride to the smallest (length-1 dimensions
/// first): visiting them in this order, row-major, walks its memory in increasing order.
///
/// ```
/// use rustadam::layout::memory_order;
/// assert_eq!(memory_order(&[2, 3], &[3, 1]), vec![0, 1]);
/// assert_eq!(memory_order(&[2, 3], &[1, 2]), vec![1, 0]);  // transposed
/// ```
pub fn memory_order(shape: &[usize], strides: &[isize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..shape.len()).collect();
    order.sort_by_key(|&d| std::cmp::Reverse(if shape[d] > 1 { strides[d] } else { isize::MAX }));
    order
}

/// A view's elements, row-major over the dimensions in `order` (a permutation of its
/// dimensions), as 2-D slabs of its two innermost dimensions of length > 1:
/// `f(offset, (rows, row_stride), (cols, col_stride))`, in elements from the view's first
/// element. A missing dimension is `(1, 0)`; an empty view has no slab.
///
/// ```
/// use rustadam::layout::slabs;
/// let mut seen = Vec::new();
/// slabs(&[2, 2, 3], &[6, 3, 1], &[0, 1, 2], |off, rows, cols| seen.push((off, rows, cols)));
/// assert_eq!(seen, vec![(0, (2, 3), (3, 1)), (6, (2, 3), (3, 1))]);
/// ```
pub fn slabs(
    shape: &[usize],
    strides: &[isize],
    order: &[usize],
    mut f: impl FnMut(isize, (usize, isize), (usize, isize)),
) {
    if shape.contains(&0) {
        return;
    }
    let mut dims: Vec<usize> = order.iter().copied().filter(|&d| shape[d] > 1).collect();
    let mut take = || dims.pop().map_or((1, 0), |d| (shape[d], strides[d]));
    let (cols, rows) = (take(), take());
    let outer = dims;
    let mut idx = vec![0usize; outer.len()];
    let mut off = 0isize;
    loop {
        f(off, rows, cols);
        let mut k = outer.len();
        loop {
            if k == 0 {
                return;
            }
            k -= 1;
            let d = outer[k];
            idx[k] += 1;
            off += strides[d];
            if idx[k] < shape[d] {
                break;
            }
            off -= strides[d] * shape[d] as isize;
            idx[k] = 0;
        }
    }
}

/// A byte range `[start, end)` one buffer of a call occupies, and whether the call writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// Whether the call writes the buffer (reads may share memory with each other).
    pub written: bool,
}

/// Every pair of spans `(i, j)`, `i < j`, that share a byte where at least one is written.
/// Empty spans overlap nothing.
///
/// A sweep over the spans sorted by start: it compares each span with those still open, so it
/// costs O(n log n) plus the number of open spans met, which is small unless many overlap.
///
/// ```
/// use rustadam::layout::{conflicts, Span};
/// let s = |start, end, written| Span { start, end, written };
/// assert_eq!(conflicts(&[s(0, 8, true), s(8, 16, true)]), vec![]);
/// assert_eq!(conflicts(&[s(0, 8, false), s(4, 16, false)]), vec![]);
/// assert_eq!(conflicts(&[s(0, 8, false), s(4, 16, true)]), vec![(0, 1)]);
/// ```
pub fn conflicts(spans: &[Span]) -> Vec<(usize, usize)> {
    // Sorted as (start, index) pairs side by side: sorting indices by a key read through
    // them would jump around memory for every comparison. The order of equal starts does not
    // matter: every pair open at once is compared. The stable sort merges runs already in
    // order (or reversed): spans listed tensor by tensor in allocation order cost about one
    // pass per run.
    let mut order: Vec<(usize, usize)> = (0..spans.len())
        .filter(|&i| spans[i].start < spans[i].end)
        .map(|i| (spans[i].start, i))
        .collect();
    order.sort_by_key(|&(start, _)| start);
    let mut open: Vec<usize> = Vec::new();
    let mut found = Vec::new();
    for &(_, i) in &order {
        let s = spans[i];
        open.retain(|&j| spans[j].end > s.start);
        for &j in &open {
            if s.written || spans[j].written {
                found.push((i.min(j), i.max(j)));
            }
        }
        open.push(i);
    }
    found.sort_unstable();
    found
}

/// The first pair of [`conflicts`] (the smallest `(i, j)`), found without allocating: every
/// pair is compared, so it is meant for a handful of spans (one parameter's buffers).
///
/// ```
/// use rustadam::layout::{first_conflict, Span};
/// let s = |start, end, written| Span { start, end, written };
/// assert_eq!(first_conflict(&[s(0, 8, true), s(8, 16, true)]), None);
/// assert_eq!(first_conflict(&[s(0, 8, false), s(20, 24, true), s(4, 22, true)]), Some((0, 2)));
/// ```
pub fn first_conflict(spans: &[Span]) -> Option<(usize, usize)> {
    (0..spans.len())
        .flat_map(|i| (i + 1..spans.len()).map(move |j| (i, j)))
        .find(|&(i, j)| {
            let (a, b) = (spans[i], spans[j]);
            let overlap = a.start < a.end && b.start < b.end && a.start < b.end && b.start < a.end;
            overlap && (a.written || b.written)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element offset of a view, by enumeration.
    fn offsets(shape: &[usize], strides: &[isize]) -> Vec<isize> {
        let mut out = vec![0isize];
        for (&n, &s) in shape.iter().zip(strides) {
            out = out
                .iter()
                .flat_map(|&o| (0..n as isize).map(move |k| o + k * s))
                .collect();
        }
        out
    }

    /// Small pseudo-random views: shapes up to 3 dims of length 0..4, strides -6..=6.
    fn views() -> Vec<(Vec<usize>, Vec<isize>)> {
        let mut out = Vec::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..4000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ndim = (x % 4) as usize;
            let shape: Vec<usize> = (0..ndim)
                .map(|d| ((x >> (8 + 4 * d)) % 5) as usize)
                .collect();
            let strides: Vec<isize> = (0..ndim)
                .map(|d| ((x >> (24 + 5 * d)) % 13) as isize - 6)
                .collect();
            out.push((shape, strides));
        }
        out
    }

    #[test]
    fn a_stride_list_of_another_length_is_refused_not_truncated() {
        for (shape, strides) in [(&[2usize, 3][..], &[1isize][..]), (&[3][..], &[][..])] {
            for f in [
                |a: &[usize], b: &[isize]| offset_range(a, b).is_some(),
                |a: &[usize], b: &[isize]| is_dense(a, b),
                |a: &[usize], b: &[isize]| is_non_overlapping(a, b),
            ] {
                let r = std::panic::catch_unwind(|| f(shape, strides));
                assert!(r.is_err(), "{shape:?} {strides:?} was answered");
            }
        }
    }

    #[test]
    fn offset_range_matches_enumeration() {
        for (shape, strides) in views() {
            let all = offsets(&shape, &strides);
            let expected = if shape.contains(&0) {
                None
            } else {
                Some((*all.iter().min().unwrap(), *all.iter().max().unwrap()))
            };
            assert_eq!(
                offset_range(&shape, &strides),
                expected,
                "{shape:?} {strides:?}"
            );
        }
    }

    #[test]
    fn a_reach_beyond_isize_fits_no_memory() {
        let nowhere = Some((isize::MIN, isize::MAX));
        assert_eq!(offset_range(&[usize::MAX], &[1]), nowhere);
        assert_eq!(offset_range(&[usize::MAX], &[-1]), nowhere);
        assert_eq!(offset_range(&[3], &[isize::MAX]), nowhere);
        assert_eq!(offset_range(&[2, 2], &[isize::MAX, isize::MAX]), nowhere);
        assert_eq!(offset_range(&[usize::MAX, 0], &[1, 1]), None); // empty all the same
        let big = (isize::MAX as usize) + 1; // n − 1 = isize::MAX still fits
        assert_eq!(offset_range(&[big], &[1]), Some((0, isize::MAX)));
    }

    #[test]
    fn dense_and_non_overlapping_match_enumeration() {
        for (shape, strides) in views() {
            let mut all = offsets(&shape, &strides);
            if shape.contains(&0) {
                continue;
            }
            let n = all.len();
            all.sort_unstable();
            let distinct = all.windows(2).all(|w| w[0] != w[1]);
            let consecutive = all[0] == 0 && all[n - 1] == n as isize - 1 && distinct;
            // Dense means one slot each of 0..n, reached with non-negative strides.
            if is_dense(&shape, &strides) {
                assert!(consecutive, "{shape:?} {strides:?}");
            } else if consecutive {
                // Only a negative stride can make consecutive slots not dense.
                assert!(
                    shape.iter().zip(&strides).any(|(&l, &s)| l > 1 && s < 0),
                    "{shape:?} {strides:?}"
                );
            }
            // The sufficient test never calls an overlapping view non-overlapping.
            if is_non_overlapping(&shape, &strides) {
                assert!(distinct, "{shape:?} {strides:?}");
            }
        }
    }

    /// The offsets of a view in row-major order over `order`, by enumeration.
    fn offsets_in(shape: &[usize], strides: &[isize], order: &[usize]) -> Vec<isize> {
        let shape: Vec<usize> = order.iter().map(|&d| shape[d]).collect();
        let strides: Vec<isize> = order.iter().map(|&d| strides[d]).collect();
        offsets(&shape, &strides)
    }

    #[test]
    fn slabs_visit_every_element_in_order() {
        for (k, (shape, strides)) in views().into_iter().enumerate() {
            // Every permutation of up to 3 dimensions, picked by k.
            let mut order: Vec<usize> = (0..shape.len()).collect();
            order.rotate_left(k % shape.len().max(1));
            if k % 2 == 1 {
                order.reverse();
            }
            let mut got = Vec::new();
            slabs(&shape, &strides, &order, |off, (rows, rs), (cols, cs)| {
                for r in 0..rows as isize {
                    for c in 0..cols as isize {
                        got.push(off + r * rs + c * cs);
                    }
                }
            });
            let expected = if shape.contains(&0) {
                vec![]
            } else {
                offsets_in(&shape, &strides, &order)
            };
            assert_eq!(got, expected, "{shape:?} {strides:?} {order:?}");
        }
    }

    #[test]
    fn memory_order_walks_a_dense_view_in_order() {
        for (shape, strides) in views() {
            if shape.contains(&0) || !is_dense(&shape, &strides) {
                continue;
            }
            let order = memory_order(&shape, &strides);
            let walk = offsets_in(&shape, &strides, &order);
            let expected: Vec<isize> = (0..walk.len() as isize).collect();
            assert_eq!(walk, expected, "{shape:?} {strides:?} {order:?}");
        }
    }

    #[test]
    fn conflicts_match_brute_force() {
        let mut x: u64 = 12345;
        for round in 0..300 {
            let n = 1 + round % 12;
            let spans: Vec<Span> = (0..n)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let start = ((x >> 33) % 64) as usize;
                    let len = ((x >> 45) % 12) as usize;
                    Span {
                        start,
                        end: start + len,
                        written: (x >> 60).is_multiple_of(2),
                    }
                })
                .collect();
            let mut expected = Vec::new();
            for i in 0..n {
                for j in i + 1..n {
                    let (a, b) = (spans[i], spans[j]);
                    let share = a.start.max(b.start) < a.end.min(b.end);
                    if share && (a.written || b.written) {
                        expected.push((i, j));
                    }
                }
            }
            assert_eq!(conflicts(&spans), expected, "{spans:?}");
            assert_eq!(
                first_conflict(&spans),
                expected.first().copied(),
                "{spans:?}"
            );
        }
    }
}
