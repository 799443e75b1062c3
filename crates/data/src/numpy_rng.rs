//! NumPy's default generator (`np.random.default_rng(seed)`: SeedSequence feeding PCG64) and its
//! `permutation(n)`, so a seeded split picks the same rows as `datasets`' `train_test_split`.

/// NumPy's `SeedSequence` for an integer entropy with no spawn key.
struct SeedSequence {
    pool: [u32; 4],
}

const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;

impl SeedSequence {
    fn new(seed: u64) -> Self {
        // The integer is split into 32-bit words, least significant first (at least one word).
        let entropy: Vec<u32> = if seed >> 32 == 0 {
            vec![seed as u32]
        } else {
            vec![seed as u32, (seed >> 32) as u32]
        };
        let mut hash_const = INIT_A;
        let mut hashmix = |value: u32| {
            let mut value = value ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_A);
            value = value.wrapping_mul(hash_const);
            value ^ (value >> XSHIFT)
        };
        let mix = |x: u32, y: u32| {
            let result = MIX_MULT_L
                .wrapping_mul(x)
                .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
            result ^ (result >> XSHIFT)
        };
        let mut pool = [0u32; 4];
        for (i, slot) in pool.iter_mut().enumerate() {
            *slot = hashmix(entropy.get(i).copied().unwrap_or(0));
        }
        for src in 0..pool.len() {
            for dst in 0..pool.len() {
                if src != dst {
                    pool[dst] = mix(pool[dst], hashmix(pool[src]));
                }
            }
        }
        Self { pool }
    }

    /// `generate_state(n, np.uint64)`: 2n 32-bit words paired little-endian.
    fn generate_state_u64(&self, n: usize) -> Vec<u64> {
        let mut hash_const = INIT_B;
        let words: Vec<u32> = (0..2 * n)
            .map(|i| {
                let mut value = self.pool[i % self.pool.len()] ^ hash_const;
                hash_const = hash_const.wrapping_mul(MULT_B);
                value = value.wrapping_mul(hash_const);
                value ^ (value >> XSHIFT)
            })
            .collect();
        words
            .chunks(2)
            .map(|pair| u64::from(pair[0]) | (u64::from(pair[1]) << 32))
            .collect()
    }
}

const PCG_MULTIPLIER: u128 = (2549297995355413924u128 << 64) | 4865540595714422341u128;

/// PCG64 (XSL-RR 128/64) with NumPy's buffered 32-bit draws.
pub struct Pcg64 {
    state: u128,
    increment: u128,
    buffered: Option<u32>,
}

impl Pcg64 {
    /// `np.random.default_rng(seed)`'s bit generator.
    pub fn from_seed(seed: u64) -> Self {
        let words = SeedSequence::new(seed).generate_state_u64(4);
        let initstate = (u128::from(words[0]) << 64) | u128::from(words[1]);
        let initseq = (u128::from(words[2]) << 64) | u128::from(words[3]);
        let mut rng = Self {
            state: 0,
            increment: (initseq << 1) | 1,
            buffered: None,
        };
        rng.step();
        rng.state = rng.state.wrapping_add(initstate);
        rng.step();
        rng
    }

    fn step(&mut self) {
        self.state = self
            .state
            .wrapping_mul(PCG_MULTIPLIER)
            .wrapping_add(self.increment);
    }

    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let rotation = (self.state >> 122) as u32;
        (((self.state >> 64) as u64) ^ (self.state as u64)).rotate_right(rotation)
    }

    /// The low half of a 64-bit draw, then its high half on the next call.
    pub fn next_u32(&mut self) -> u32 {
        if let Some(high) = self.buffered.take() {
            return high;
        }
        let next = self.next_u64();
        self.buffered = Some((next >> 32) as u32);
        next as u32
    }

    /// A uniform integer in `0..=max` by masked rejection, as NumPy's `random_interval`.
    fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        loop {
            let value = if max <= u64::from(u32::MAX) {
                u64::from(self.next_u32()) & mask
            } else {
                self.next_u64() & mask
            };
            if value <= max {
                return value;
            }
        }
    }

    /// `Generator.permutation(n)`: a Fisher-Yates shuffle of `0..n` from the last position down.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.interval(i as u64) as usize;
            order.swap(i, j);
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values printed by NumPy 2.4: np.random.default_rng(seed).permutation(n) and
    // np.random.default_rng(seed).bit_generator.random_raw().
    #[test]
    fn matches_numpy_default_rng() {
        assert_eq!(
            Pcg64::from_seed(42).permutation(10),
            vec![5, 6, 0, 7, 3, 2, 4, 9, 1, 8]
        );
        assert_eq!(Pcg64::from_seed(0).next_u64(), 11749869230777074271);
        assert_eq!(
            Pcg64::from_seed(1234).permutation(12),
            vec![0, 9, 11, 5, 6, 2, 8, 4, 7, 1, 3, 10]
        );
        assert_eq!(
            Pcg64::from_seed(1 << 40).permutation(6),
            vec![0, 5, 3, 4, 2, 1]
        );
        assert_eq!(
            Pcg64::from_seed(7).permutation(100_000)[..5],
            [45070, 71435, 99538, 45453, 95412]
        );
    }
}
