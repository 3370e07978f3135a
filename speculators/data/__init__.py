"""Stage 1a, chat data: sources and selection, loss masks, regeneration, tokenised datasets.

`sources` reads and selects conversations, `masks` turns one conversation into token rows,
`regenerate` replaces assistant turns by the target's answers, `prepare` writes the datasets.
"""
