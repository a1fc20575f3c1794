mod harness;
mod limits;
mod llm;
mod openai;
mod redelivery;
