# The report's items: which outputs it shows, under which caption (workflow/report/*.rst).


# each freeze table's caption is workflow/report/<file's stem>.rst but these; token_displacement.h5 is not in the
# report
FREEZE_CAPTIONS = {"lattice_positions": "lattice_positions_table", "token_steps": None}


def freeze_output(key, file):
    """A freeze output's path, as a report item with its caption unless it has none."""
    path = f"results/{{experiment}}/{file}"
    caption = FREEZE_CAPTIONS.get(key, file.rsplit(".", 1)[0])
    if caption is None:
        return path
    return report(path, caption=f"../workflow/report/{caption}.rst", category="{experiment}", subcategory="tables")
