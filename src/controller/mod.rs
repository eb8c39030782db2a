//! The Experiment controller. `build` holds the pure builders of the objects it creates.

pub mod build;
