mod harness;
mod limits;
mod llm;
mod openai;
mod paid_once;
mod redelivery;
