//! Projections: read models fed from `read_all`, with a checkpoint committed
//! together with their changes.
