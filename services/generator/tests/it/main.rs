mod cost;
mod harness;
mod hostile;
mod limits;
mod llm;
mod openai;
mod paid_once;
mod redelivery;
