mod restart;
mod ssrf;
