mod harness;
mod redelivery;
