//! Sans-IO media core.
