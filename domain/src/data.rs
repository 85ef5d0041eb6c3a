//! The data policies read and write: candidates to score, the decisions of
//! one batch, and aggregated outcomes that update the models.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::users::UserSet;

/// Why a matrix or a batch does not have the shape it should.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ShapeError {
    /// A feature row has another length than the matrix's dimension.
    #[error("feature row has {got} values; the dimension is {dim}")]
    RowLength {
        /// The dimension.
        dim: usize,
        /// The row's length.
        got: usize,
    },
    /// The flat feature buffer is not `rows × dim` long.
    #[error("{values} feature values do not make {rows} rows of {dim}")]
    Matrix {
        /// Rows expected.
        rows: usize,
        /// The dimension.
        dim: usize,
        /// Values given.
        values: usize,
    },
    /// A feature value is NaN or infinite.
    #[error("feature value {value} in row {row} is not finite")]
    NotFinite {
        /// The row.
        row: usize,
        /// The value.
        value: f32,
    },
    /// An outcome has more successes than trials.
    #[error("{successes} successes out of {trials} trials")]
    Successes {
        /// The trials.
        trials: u32,
        /// The successes.
        successes: u32,
    },
    /// Parallel columns have different lengths.
    #[error("columns differ in length: {lengths:?}")]
    Columns {
        /// The lengths found.
        lengths: Vec<usize>,
    },
    /// The dimension is 0 or above [`Candidates::MAX_DIM`].
    #[error("dimension {dim} is outside 1..={max}")]
    Dimension {
        /// The dimension.
        dim: usize,
        /// The limit.
        max: usize,
    },
}

fn check_dim(dim: usize) -> Result<(), ShapeError> {
    if dim == 0 || dim > Candidates::MAX_DIM {
        return Err(ShapeError::Dimension {
            dim,
            max: Candidates::MAX_DIM,
        });
    }
    Ok(())
}

fn check_row(row_index: usize, dim: usize, x: &[f32]) -> Result<(), ShapeError> {
    if x.len() != dim {
        return Err(ShapeError::RowLength { dim, got: x.len() });
    }
    if let Some(&value) = x.iter().find(|v| !v.is_finite()) {
        return Err(ShapeError::NotFinite {
            row: row_index,
            value,
        });
    }
    Ok(())
}

/// The users a policy may choose from: ids and a dense, row-major `f32`
/// feature matrix, one row per user.
///
/// The columns are shared: a clone costs reference counts, not a copy of
/// the matrix, so campaigns that target one audience hold it once
/// (10,000,000 users × 16 features are 640 MB). Dropping rows
/// ([`Candidates::retain`]) does not copy the matrix either: the result is
/// a *selection* of the shared matrix's rows (8 bytes a kept row: its user
/// and its row number), which is how a campaign's remaining candidates
/// shrink batch by batch. Only [`Candidates::push`] on a shared or
/// selected matrix copies (the selected rows) first.
///
/// Equality and the serialised form are those of the rows in order
/// (`dim`, `users`, `features`), whether shared or selected.
#[derive(Debug, Clone)]
pub struct Candidates {
    dim: usize,
    /// The user of each row in use, in order.
    users: Arc<Vec<u32>>,
    /// The matrix the rows come from (all of them when `rows` is `None`).
    features: Arc<Vec<f32>>,
    /// The matrix rows in use, when a subset: row `i` is matrix row
    /// `rows[i]`.
    rows: Option<Arc<Vec<u32>>>,
}

/// [`Candidates`] as serialised: the rows in use, contiguous.
#[derive(Serialize, Deserialize)]
#[serde(rename = "Candidates")]
struct CandidatesRepr {
    dim: usize,
    users: Vec<u32>,
    features: Vec<f32>,
}

impl Serialize for Candidates {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut c = self.clone();
        c.compact();
        CandidatesRepr {
            dim: c.dim,
            users: c.users.to_vec(),
            features: c.features.to_vec(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Candidates {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = CandidatesRepr::deserialize(d)?;
        Candidates::from_parts(r.dim, r.users, r.features).map_err(serde::de::Error::custom)
    }
}

impl PartialEq for Candidates {
    fn eq(&self, other: &Self) -> bool {
        self.dim == other.dim
            && self.users == other.users
            && (self.shares_columns_with(other) || self.rows().eq(other.rows()))
    }
}

impl Candidates {
    /// The largest feature dimension (the models invert `(dim+1)²`
    /// matrices).
    pub const MAX_DIM: usize = 64;

    /// No candidates yet, with rows of `dim` features.
    pub fn new(dim: usize) -> Result<Self, ShapeError> {
        Self::with_capacity(dim, 0)
    }

    /// No candidates yet, with room for `rows` users.
    pub fn with_capacity(dim: usize, rows: usize) -> Result<Self, ShapeError> {
        check_dim(dim)?;
        Ok(Self {
            dim,
            users: Arc::new(Vec::with_capacity(rows)),
            features: Arc::new(Vec::with_capacity(rows * dim)),
            rows: None,
        })
    }

    /// Candidates from a user column and a flat row-major feature matrix.
    pub fn from_parts(dim: usize, users: Vec<u32>, features: Vec<f32>) -> Result<Self, ShapeError> {
        check_dim(dim)?;
        if features.len() != users.len() * dim {
            return Err(ShapeError::Matrix {
                rows: users.len(),
                dim,
                values: features.len(),
            });
        }
        for (i, row) in features.chunks_exact(dim).enumerate() {
            check_row(i, dim, row)?;
        }
        Ok(Self {
            dim,
            users: Arc::new(users),
            features: Arc::new(features),
            rows: None,
        })
    }

    /// Appends a user with its features (a selection is made contiguous
    /// first).
    pub fn push(&mut self, user: u32, x: &[f32]) -> Result<(), ShapeError> {
        check_row(self.users.len(), self.dim, x)?;
        self.compact();
        Arc::make_mut(&mut self.users).push(user);
        Arc::make_mut(&mut self.features).extend_from_slice(x);
        Ok(())
    }

    /// Makes a selection contiguous: copies the rows in use into a matrix
    /// of their own.
    fn compact(&mut self) {
        let Some(rows) = self.rows.take() else {
            return;
        };
        let dim = self.dim;
        let mut features = Vec::with_capacity(rows.len() * dim);
        for &r in rows.iter() {
            let r = r as usize;
            features.extend_from_slice(&self.features[r * dim..(r + 1) * dim]);
        }
        self.features = Arc::new(features);
    }

    /// The number of candidates.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The feature dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The user ids, one per row.
    pub fn users(&self) -> &[u32] {
        &self.users
    }

    /// Row `i`'s position in the shared matrix (`i` itself unless this is
    /// a selection).
    ///
    /// # Panics
    /// If `i >= len()`.
    #[inline]
    pub fn matrix_row(&self, i: usize) -> usize {
        match &self.rows {
            None => {
                assert!(i < self.users.len(), "row {i} of {}", self.users.len());
                i
            }
            Some(rows) => rows[i] as usize,
        }
    }

    /// Row `i`'s features.
    ///
    /// # Panics
    /// If `i >= len()`.
    #[inline]
    pub fn row(&self, i: usize) -> &[f32] {
        // Without a selection the matrix holds exactly `len` rows, so the
        // slice's own bounds check stands for the row's.
        let r = match &self.rows {
            None => i,
            Some(rows) => rows[i] as usize,
        };
        &self.features[r * self.dim..(r + 1) * self.dim]
    }

    /// Every row's features, in order.
    pub fn rows(&self) -> Rows<'_> {
        match &self.rows {
            None => Rows::Contiguous(self.features.chunks_exact(self.dim)),
            Some(rows) => Rows::Selected {
                features: &self.features,
                dim: self.dim,
                rows: rows.iter(),
            },
        }
    }

    /// The rows as one contiguous row-major matrix, when they are one
    /// (not a selection).
    pub fn contiguous(&self) -> Option<&[f32]> {
        match self.rows {
            None => Some(&self.features),
            Some(_) => None,
        }
    }

    /// Keeps only the rows whose user is not in `messaged`, in place.
    pub fn retain_unmessaged(&mut self, messaged: &UserSet) {
        self.retain(|u| !messaged.contains(u));
    }

    /// Keeps only the rows whose user satisfies `keep`, in place, in order.
    /// The matrix is not copied: the result selects its rows.
    pub fn retain(&mut self, mut keep: impl FnMut(u32) -> bool) {
        let users = Arc::clone(&self.users);
        self.retain_rows(|i, _| keep(users[i]));
    }

    /// Keeps only the rows `i` for which `keep(i, matrix_row(i))` holds,
    /// in place, in order. The matrix is not copied: the result selects
    /// its rows (nothing changes when every row is kept).
    pub fn retain_rows(&mut self, mut keep: impl FnMut(usize, usize) -> bool) {
        let n = self.len();
        let mut users = Vec::new();
        let mut rows = Vec::new();
        let mut dropped = false;
        for i in 0..n {
            let r = self.matrix_row(i);
            if keep(i, r) {
                if dropped {
                    users.push(self.users[i]);
                    rows.push(r as u32);
                }
            } else if !dropped {
                // The first row dropped: everything before it is kept.
                dropped = true;
                users.reserve(n - i);
                rows.reserve(n - i);
                users.extend_from_slice(&self.users[..i]);
                rows.extend((0..i).map(|j| self.matrix_row(j) as u32));
            }
        }
        if !dropped {
            return; // nothing to drop: a shared matrix stays shared
        }
        users.shrink_to_fit();
        rows.shrink_to_fit();
        self.users = Arc::new(users);
        self.rows = Some(Arc::new(rows));
    }

    /// Whether `self` and `other` hold the very same columns (a clone that
    /// neither changed since), not merely equal ones.
    pub fn shares_columns_with(&self, other: &Candidates) -> bool {
        Arc::ptr_eq(&self.users, &other.users)
            && Arc::ptr_eq(&self.features, &other.features)
            && match (&self.rows, &other.rows) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }

    /// Whether `self` reads its rows from the same matrix as `other` (a
    /// selection of it, or the same columns), without a copy.
    pub fn shares_matrix_with(&self, other: &Candidates) -> bool {
        Arc::ptr_eq(&self.features, &other.features)
    }
}

/// The rows of [`Candidates`], in order ([`Candidates::rows`]).
#[derive(Debug, Clone)]
pub enum Rows<'a> {
    /// A whole matrix.
    Contiguous(std::slice::ChunksExact<'a, f32>),
    /// A selection of a matrix's rows.
    Selected {
        /// The matrix.
        features: &'a [f32],
        /// Its row length.
        dim: usize,
        /// The rows selected.
        rows: std::slice::Iter<'a, u32>,
    },
}

impl<'a> Iterator for Rows<'a> {
    type Item = &'a [f32];

    #[inline]
    fn next(&mut self) -> Option<&'a [f32]> {
        match self {
            Rows::Contiguous(c) => c.next(),
            Rows::Selected {
                features,
                dim,
                rows,
            } => {
                let r = *rows.next()? as usize;
                Some(&features[r * *dim..(r + 1) * *dim])
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = match self {
            Rows::Contiguous(c) => c.len(),
            Rows::Selected { rows, .. } => rows.len(),
        };
        (n, Some(n))
    }
}

impl ExactSizeIterator for Rows<'_> {}

/// What a policy decided for one batch: parallel columns of users, the
/// creative (an index into the campaign's creatives) each gets, and the
/// probability with which the policy would have made that choice.
///
/// The propensity of row `i` is the probability that the policy, in the
/// state it was in, sends `users[i]` creative `creatives[i]` in this batch
/// (so it includes the chance of the user being chosen at all). It is what
/// off-policy estimators weight by.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Decisions {
    /// The chosen users.
    pub users: Vec<u32>,
    /// The creative index for each user.
    pub creatives: Vec<u16>,
    /// The propensity of each choice, in (0, 1].
    pub propensities: Vec<f32>,
}

impl Decisions {
    /// No decisions, with room for `n`.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            users: Vec::with_capacity(n),
            creatives: Vec::with_capacity(n),
            propensities: Vec::with_capacity(n),
        }
    }

    /// Adds one decision.
    pub fn push(&mut self, user: u32, creative: u16, propensity: f32) {
        self.users.push(user);
        self.creatives.push(creative);
        self.propensities.push(propensity);
    }

    /// The number of users chosen (when the columns agree in length).
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether no user was chosen.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Checks that the three columns have the same length.
    pub fn check_shape(&self) -> Result<(), ShapeError> {
        let lengths = vec![
            self.users.len(),
            self.creatives.len(),
            self.propensities.len(),
        ];
        if lengths.iter().any(|&l| l != lengths[0]) {
            return Err(ShapeError::Columns { lengths });
        }
        Ok(())
    }

    /// Adds `other`'s rows after these (a large batch's parts joined back
    /// together, in part order).
    pub fn append(&mut self, other: &Decisions) {
        self.users.extend_from_slice(&other.users);
        self.creatives.extend_from_slice(&other.creatives);
        self.propensities.extend_from_slice(&other.propensities);
    }

    /// Rows `range` as their own decisions (one part of a large batch).
    /// The range is cut to the shortest column.
    pub fn rows(&self, range: std::ops::Range<usize>) -> Decisions {
        let n = self
            .users
            .len()
            .min(self.creatives.len())
            .min(self.propensities.len());
        let end = range.end.min(n);
        let r = range.start.min(end)..end;
        Decisions {
            users: self.users[r.clone()].to_vec(),
            creatives: self.creatives[r.clone()].to_vec(),
            propensities: self.propensities[r].to_vec(),
        }
    }

    /// `(user, creative, propensity)` rows.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u16, f32)> + '_ {
        self.users
            .iter()
            .zip(&self.creatives)
            .zip(&self.propensities)
            .map(|((&u, &c), &p)| (u, c, p))
    }

    /// How many users got each creative, for `creatives` creatives (indices
    /// beyond are ignored).
    pub fn per_creative(&self, creatives: usize) -> Vec<u32> {
        let mut counts = vec![0u32; creatives];
        for &c in &self.creatives {
            if let Some(n) = counts.get_mut(usize::from(c)) {
                *n += 1;
            }
        }
        counts
    }
}

/// Aggregated reactions that update a model: rows of (creative, feature
/// vector, trials, successes).
///
/// One row per user (`trials = 1`, `successes` 0 or 1) carries per-user
/// outcomes; one row per creative × feature bucket (the bucket's
/// representative features, e.g. its centroid, with the bucket's counts)
/// carries what a one-minute windowed aggregation produces. Models treat a
/// row as `trials` Bernoulli observations at `x`, so both forms feed the
/// same update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcomes {
    dim: usize,
    creatives: Vec<u16>,
    features: Vec<f32>,
    trials: Vec<u32>,
    successes: Vec<u32>,
}

/// One row of [`Outcomes`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutcomeRow<'a> {
    /// The creative index.
    pub creative: u16,
    /// The features.
    pub x: &'a [f32],
    /// Messages observed.
    pub trials: u32,
    /// Of which reacted.
    pub successes: u32,
}

impl Outcomes {
    /// No outcomes yet, for feature rows of `dim`.
    pub fn new(dim: usize) -> Result<Self, ShapeError> {
        check_dim(dim)?;
        Ok(Self {
            dim,
            creatives: Vec::new(),
            features: Vec::new(),
            trials: Vec::new(),
            successes: Vec::new(),
        })
    }

    /// Adds a row: `trials` messages of `creative` to users with features
    /// `x` (or a bucket represented by `x`), `successes` of which reacted.
    pub fn push(
        &mut self,
        creative: u16,
        x: &[f32],
        trials: u32,
        successes: u32,
    ) -> Result<(), ShapeError> {
        check_row(self.creatives.len(), self.dim, x)?;
        if successes > trials {
            return Err(ShapeError::Successes { trials, successes });
        }
        self.creatives.push(creative);
        self.features.extend_from_slice(x);
        self.trials.push(trials);
        self.successes.push(successes);
        Ok(())
    }

    /// The feature dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The number of rows.
    pub fn len(&self) -> usize {
        self.creatives.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.creatives.is_empty()
    }

    /// Row `i`.
    ///
    /// # Panics
    /// If `i >= len()`.
    pub fn row(&self, i: usize) -> OutcomeRow<'_> {
        OutcomeRow {
            creative: self.creatives[i],
            x: &self.features[i * self.dim..(i + 1) * self.dim],
            trials: self.trials[i],
            successes: self.successes[i],
        }
    }

    /// All rows.
    pub fn rows(&self) -> impl Iterator<Item = OutcomeRow<'_>> + '_ {
        (0..self.len()).map(|i| self.row(i))
    }

    /// Total `(trials, successes)` per creative, for `creatives` creatives
    /// (rows of other creatives are ignored).
    pub fn totals(&self, creatives: usize) -> Vec<(u64, u64)> {
        let mut t = vec![(0u64, 0u64); creatives];
        for i in 0..self.len() {
            if let Some(slot) = t.get_mut(usize::from(self.creatives[i])) {
                slot.0 += u64::from(self.trials[i]);
                slot.1 += u64::from(self.successes[i]);
            }
        }
        t
    }

    /// The largest creative index in any row, if there are rows.
    pub fn max_creative(&self) -> Option<u16> {
        self.creatives.iter().copied().max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_columns_until_changed() {
        let a =
            Candidates::from_parts(2, vec![1, 2, 3], vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        let mut b = a.clone();
        assert!(b.shares_columns_with(&a));
        b.retain(|_| true);
        assert!(
            b.shares_columns_with(&a),
            "keeping every row copies nothing"
        );
        b.retain(|u| u != 2);
        assert!(!b.shares_columns_with(&a));
        assert!(
            b.shares_matrix_with(&a),
            "dropping rows selects, not copies"
        );
        assert_eq!(b.users(), &[1, 3]);
        assert_eq!(flat(&b), [0.0, 1.0, 4.0, 5.0]);
        assert_eq!((b.matrix_row(0), b.matrix_row(1)), (0, 2));
        assert_eq!(b.contiguous(), None);
        assert_eq!(a.users(), &[1, 2, 3], "the original is untouched");
        assert_eq!(a.contiguous(), Some(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0][..]));
        let mut c = a.clone();
        c.push(4, &[6.0, 7.0]).unwrap();
        assert_eq!((a.len(), c.len()), (3, 4));
        let json = serde_json::to_string(&a).unwrap();
        let back: Candidates = serde_json::from_str(&json).unwrap();
        assert_eq!(back, a);
        // A selection serialises as its rows, and equals a copy of them.
        let copy = Candidates::from_parts(2, vec![1, 3], vec![0.0, 1.0, 4.0, 5.0]).unwrap();
        assert_eq!(b, copy);
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(json, serde_json::to_string(&copy).unwrap());
        let back: Candidates = serde_json::from_str(&json).unwrap();
        assert_eq!(back, b);
        // A selection of a selection still reads the first matrix.
        let mut d = b.clone();
        d.retain_rows(|_, r| r != 0);
        assert!(d.shares_matrix_with(&a));
        assert_eq!((d.users(), flat(&d)), (&[3][..], vec![4.0, 5.0]));
        // Pushing onto a selection copies its rows first.
        b.push(9, &[8.0, 9.0]).unwrap();
        assert!(!b.shares_matrix_with(&a));
        assert_eq!(flat(&b), [0.0, 1.0, 4.0, 5.0, 8.0, 9.0]);
        assert_eq!(b.contiguous().map(<[f32]>::len), Some(6));
    }

    fn flat(c: &Candidates) -> Vec<f32> {
        c.rows().flatten().copied().collect()
    }

    #[test]
    fn candidates_check_shape_and_retain_in_place() {
        assert!(matches!(
            Candidates::new(0),
            Err(ShapeError::Dimension { .. })
        ));
        assert!(matches!(
            Candidates::from_parts(2, vec![1, 2], vec![0.0; 3]),
            Err(ShapeError::Matrix { .. })
        ));
        let mut c = Candidates::new(2).unwrap();
        for u in 0..6u32 {
            c.push(u * 10, &[u as f32, -(u as f32)]).unwrap();
        }
        assert!(matches!(
            c.push(1, &[1.0]),
            Err(ShapeError::RowLength { dim: 2, got: 1 })
        ));
        assert!(matches!(
            c.push(1, &[f32::NAN, 0.0]),
            Err(ShapeError::NotFinite { row: 6, .. })
        ));
        let messaged: UserSet = [0u32, 20, 50].into_iter().collect();
        c.retain_unmessaged(&messaged);
        assert_eq!(c.users(), &[10, 30, 40]);
        assert_eq!(flat(&c), [1.0, -1.0, 3.0, -3.0, 4.0, -4.0]);
        assert_eq!(c.row(2), &[4.0, -4.0]);
    }

    #[test]
    fn outcomes_total_per_creative() {
        let mut o = Outcomes::new(1).unwrap();
        o.push(0, &[1.0], 10, 3).unwrap();
        o.push(1, &[1.0], 5, 5).unwrap();
        o.push(0, &[2.0], 1, 0).unwrap();
        assert!(matches!(
            o.push(0, &[2.0], 1, 2),
            Err(ShapeError::Successes { .. })
        ));
        assert_eq!(o.totals(3), vec![(11, 3), (5, 5), (0, 0)]);
        assert_eq!(o.max_creative(), Some(1));
        assert_eq!(o.row(2).x, &[2.0]);
    }

    #[test]
    fn decisions_shape() {
        let mut d = Decisions::with_capacity(2);
        d.push(1, 0, 0.5);
        d.push(2, 1, 0.25);
        assert!(d.check_shape().is_ok());
        assert_eq!(d.per_creative(3), vec![1, 1, 0]);
        d.users.push(3);
        assert!(d.check_shape().is_err());
    }
}
