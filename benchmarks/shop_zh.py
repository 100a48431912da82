"""A Chinese bookshop handbook for `benchmarks/apps.py kb-zh`: the same measurement as the English shop, for
an assistant whose customers ask in Chinese.

梧桐书屋 (Wutong Bookhouse), a fictional bookshop in Hangzhou: 30 facts written as five pages with headings
(four Markdown, one HTML). Each fact has a calibration question (for choosing thresholds) and a held-out
question (for the numbers reported), both paraphrases a customer would type, mostly not in the page's own
words ("电话" for a page that says "致电"). 20 questions the pages do not answer: 10 held out (5 off topic,
5 about the shop) and 10 for calibration.
"""
from __future__ import annotations

from pathlib import Path

# (the page's sentence, key strings a correct reply holds, [calibration question, held-out question])
FACTS = [
    ("周一至周五的营业时间是上午9:30至晚上21:00。", ["21:00"],
     ["工作日你们几点开门几点关门？", "平时晚上几点关门？"]),
    ("周六和周日的营业时间是上午10:00至晚上22:00。", ["22:00"],
     ["周末的营业时间是几点到几点？", "星期天晚上开到几点？"]),
    ("春节期间，除夕和正月初一闭店休息，其余日子照常营业。", ["除夕"],
     ["过年的时候开门吗？", "春节哪几天不营业？"]),
    ("书店位于杭州市西湖区文三路128号。", ["文三路128号"],
     ["书店在什么地方？", "你们的地址是哪里？"]),
    ("乘坐地铁2号线到学院路站，从C出口出来步行5分钟即到。", ["学院路"],
     ["坐地铁怎么去书店？", "离书店最近的地铁站是哪一站？"]),
    ("书店后面有停车场，购书满100元可免费停车2小时。", ["2小时"],
     ["开车来有地方停吗？", "停车免费吗？能停多久？"]),
    ("如有任何问题，欢迎致电0571-8865 2210。", ["0571-8865 2210"],
     ["怎样打电话联系你们？", "你们的电话号码是多少？"]),
    ("您也可以发邮件到service@wutong.example，我们会在一个工作日内回复。", ["service@wutong.example"],
     ["可以发电子邮件给你们吗？", "客服邮箱是什么？"]),
    ("关注微信公众号“梧桐书屋”（微信号wutongshuwu），可以查询库存和活动。", ["wutongshuwu"],
     ["你们有微信公众号吗？", "在微信上怎么找到你们？"]),
    ("店内提供免费Wi-Fi，网络名称是Wutong-Guest，密码是wutong2024。", ["wutong2024"],
     ["店里有无线网络吗？", "无线网的密码是多少？"]),
    ("杭州市区内的订单，下午4点前下单，当天即可送达。", ["4点"],
     ["杭州市内送货要多久？", "在杭州今天下单今天能收到吗？"]),
    ("订单满99元全国包邮。", ["99"],
     ["买多少钱可以免运费？", "满多少包邮？"]),
    ("不满99元的订单收取运费8元。", ["8元"],
     ["运费是多少钱？", "订单金额不够包邮的话邮费怎么算？"]),
    ("寄往外省的快递一般3至5个工作日送达。", ["3至5"],
     ["寄到外地要几天？", "网上买书寄到北京需要多长时间？"]),
    ("目前只配送中国大陆地区，暂不寄往港澳台和海外。", ["大陆"],
     ["可以寄到国外吗？", "能寄到香港吗？"]),
    ("店里没有的书可以代订，一般7天到货。", ["7天"],
     ["店里没货的书能帮我订吗？", "代订的书多久能到？"]),
    ("代订图书需要预付定金20元。", ["20元"],
     ["代订要先付钱吗？", "代订的定金是多少？"]),
    ("付款可以用微信支付、支付宝、银联卡或现金。", ["支付宝"],
     ["可以用什么方式付款？", "能用支付宝付钱吗？"]),
    ("自购书之日起15天内，凭购物小票可以办理退货。", ["15天"],
     ["买的书可以退吗？", "退货的期限是几天？"]),
    ("退货的图书必须完好，没有笔记或折痕，塑封未拆。", ["塑封"],
     ["什么样的书可以退？", "退书有什么要求？"]),
    ("退款会在3个工作日内原路退回。", ["3个工作日"],
     ["退款多久到账？", "退了书以后钱什么时候回来？"]),
    ("特价书和二手书售出后不退不换。", ["不退不换"],
     ["打折的书可以退吗？", "买的二手书能换吗？"]),
    ("梧桐会员卡的年费是68元。", ["68"],
     ["办会员要花多少钱？", "会员卡一年多少钱？"]),
    ("会员购买新书一律享受9折优惠。", ["9折"],
     ["会员有什么优惠？", "会员买新书打几折？"]),
    ("会员每消费1元积1分，每100积分可以抵扣5元。", ["5元"],
     ["积分怎么用？", "100个积分能抵多少钱？"]),
    ("凭有效学生证购书可享受九五折优惠。", ["九五折"],
     ["学生买书有折扣吗？", "我是大学生，买书能便宜吗？"]),
    ("礼品卡有100元、200元和500元三种面值。", ["500"],
     ["你们有礼品卡吗？", "购书卡有哪些金额可以选？"]),
    ("礼品卡自购买之日起3年内有效。", ["3年"],
     ["礼品卡会过期吗？", "购书卡的有效期是多久？"]),
    ("每周六下午2点在二楼举办读书会，欢迎免费参加。", ["周六"],
     ["你们有读书会吗？", "读书会是星期几？"]),
    ("我们回收二手书，按定价的2折到3折收购。", ["2折"],
     ["旧书可以卖给你们吗？", "你们收旧书吗？价格怎么算？"]),
]

PAGES = [  # file, title, [(section, [fact indices])]
    ("到店指南.md", "到店指南", [
        ("营业时间", [0, 1, 2]), ("地址和交通", [3, 4, 5]), ("店内服务", [9])]),
    ("联系我们.md", "联系我们", [
        ("电话与邮件", [6, 7]), ("微信公众号", [8])]),
    ("购书与配送.md", "购书与配送", [
        ("同城配送", [10]), ("运费", [11, 12]), ("快递时效", [13, 14]), ("代订图书", [15, 16]), ("付款方式", [17])]),
    ("退换货.md", "退换货说明", [
        ("退货", [18, 19]), ("退款", [20]), ("特价书和二手书", [21])]),
    ("会员与活动.html", "会员、礼品卡与活动", [
        ("梧桐会员", [22, 23, 24]), ("学生优惠", [25]), ("礼品卡", [26, 27]), ("读书会", [28]), ("二手书回收", [29])]),
]

OUT_OF_SCOPE = [  # the pages answer none of these: 5 off topic, 5 about the shop
    "中国的首都是哪个城市？", "红烧肉怎么做才好吃？", "明天杭州会下雨吗？", "《红楼梦》的作者是谁？", "怎样才能学好英语？",
    "你们卖文具吗？", "你们在上海有分店吗？", "可以带宠物进店吗？", "你们现在招聘店员吗？", "你们提供礼品包装服务吗？",
]
DEV_OUT_OF_SCOPE = [  # for calibrating only
    "一年有多少天？", "世界上最高的山是哪座？", "怎么煮米饭？", "长城有多长？", "电脑开不了机怎么办？",
    "你们卖电子书吗？", "店里可以借书回家看吗？", "你们有儿童游乐区吗？", "可以在店里给手机充电吗？", "你们有卖咖啡吗？",
]
SYSTEM = "你是梧桐书屋的客服助理。"


def write_shop(folder: Path) -> list[Path]:
    """The five pages: a heading per section, its facts as one paragraph (Chinese runs sentences together)."""
    paths = []
    for name, title, sections in PAGES:
        path = folder / name
        if name.endswith(".html"):
            body = "".join(f"<h2>{section}</h2>\n<p>{''.join(FACTS[i][0] for i in facts)}</p>\n"
                           for section, facts in sections)
            path.write_text(f"<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\n"
                            f"<body><nav>首页 | 书目 | 帮助</nav><h1>{title}</h1>\n{body}</body></html>\n",
                            encoding="utf-8")
        else:
            body = "".join(f"## {section}\n\n{''.join(FACTS[i][0] for i in facts)}\n\n" for section, facts in sections)
            path.write_text(f"# {title}\n\n梧桐书屋，杭州的一家独立书店。\n\n{body}", encoding="utf-8")
        paths.append(path)
    return paths
