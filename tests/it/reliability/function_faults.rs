//! The function's faults.
