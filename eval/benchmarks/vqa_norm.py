"""VQA answer normalisation (EvalAI's, which the release applies to VQAv2 answers in
`convert_vqav2_for_submission.py` via `m4c_evaluator.EvalAIAnswerProcessor`), and VQA
accuracy.

normalize(text), step by step:
  1. lowercase; drop "," and "?"; "'s" -> " 's"; newlines / tabs -> spaces; strip.
  2. punctuation ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! each is deleted when it
     stands next to a space in the step-1 text, or when that text has digits joined by
     commas ("1,000"), else replaced by a space; then every "." not followed by a digit
     is deleted (at most 32 of them, the reference's quirk: it passes re.UNICODE as count).
  3. split on whitespace; number words none / zero ... ten -> digits; a / an / the
     dropped; the words of CONTRACTIONS replaced ("dont" -> "don't"); joined by spaces.
accuracy(pred, answers): the mean over each human answer left out in turn of
min(1, matches among the others / 3), all normalised (for 10 answers, the standard
VQA accuracy over the 10-choose-9 subsets).
"""

from __future__ import annotations

import re

# the reference's table as written (including its odd entries, e.g. "somebody'd" -> "somebodyd")
CONTRACTIONS = dict(p.split("=", 1) for p in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBERS["none"] = "0"
ARTICLES = {"a", "an", "the"}
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA = re.compile(r"\d,+\d")
_PERIOD = re.compile(r"\.(?!\d)")


def _punctuation(text: str) -> str:
  out = text
  joined = _DIGIT_COMMA.search(text) is not None
  for p in PUNCTUATION:
    out = out.replace(p, "" if joined or p + " " in text or " " + p in text else " ")
  return _PERIOD.sub("", out, count=32)


def normalize(text: str) -> str:
  t = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  t = _punctuation(t.replace("\n", " ").replace("\t", " ").strip())
  words = [NUMBERS.get(w, w) for w in t.lower().split()]
  return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def accuracy(pred: str, answers: list[str]) -> float:
  p, gts = normalize(pred), [normalize(a) for a in answers]
  if not gts:
    return 0.0
  hits = [sum(g == p for j, g in enumerate(gts) if j != i) for i in range(len(gts))]
  return sum(min(1.0, h / 3) for h in hits) / len(gts)
