mod bad_input;
mod batch;
mod harness;
mod lifecycle;
