mod harness;
mod hostile;
mod limits;
mod llm;
mod openai;
mod redelivery;
