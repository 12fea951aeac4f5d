//! Fast all-zero test for buffers.

/// True when every byte of `b` is zero.
pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        // OR-folding a fixed 64-byte chunk compiles to a few vector ops.
        if c.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn basics() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4096]));
        let mut b = [0u8; 4097];
        b[4096] = 1;
        assert!(!is_zero(&b));
        b[4096] = 0;
        b[63] = 1;
        assert!(!is_zero(&b));
    }

    proptest! {
        #[test]
        fn matches_simple_model(v in proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..300)) {
            prop_assert_eq!(is_zero(&v), v.iter().all(|&x| x == 0));
        }
    }
}
